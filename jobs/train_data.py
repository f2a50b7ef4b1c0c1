"""Decoding the preprocess dataset's faces for `ipsr train`, in Ray Data tasks.

Kept free of torch (numpy + Pillow only): every fresh Ray Data worker process imports this module, and a
torch import costs those processes seconds before the first batch reaches training.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SIDE = 128


def decode_faces(blobs) -> np.ndarray:
    """Encoded 128×128 faces (PNG/JPEG bytes) → uint8 NHWC RGB."""
    out = np.empty((len(blobs), IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as image:
            if image.size != (IMAGE_SIDE, IMAGE_SIDE):
                raise ValueError(f"dataset face {i} is {image.size[0]}x{image.size[1]}, expected 128x128")
            out[i] = np.asarray(image.convert("RGB"))
    return out


def decode_batch(batch: dict[str, np.ndarray], embeddings: bool = False) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: column ``image`` (bytes) → column ``hr`` (uint8 128×128×3) and ``label``, plus the
    precomputed ``hr_embedding`` (float32 [512]) when asked."""
    out = {"hr": decode_faces(batch["image"]), "label": batch["label"].astype(np.int32)}
    if embeddings:
        out["hr_embedding"] = np.stack(list(batch["hr_embedding"])).astype(np.float32)
    return out
