"""Conversions between PIL images and ipsr's tensor convention (float32 NCHW RGB in [-1, 1], 128x128).

No file I/O here: callers open files (safely) and hand over PIL images or uint8 arrays.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .unet import IMAGE_SIZE


def square_face(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """An already-cropped face (e.g. ORL's 92x112) as a size x size RGB image.

    Crops the centred square of the shorter side (keeping the face's aspect ratio; a squash would distort
    identity), then resizes with PIL's bicubic.
    """
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(images: Image.Image | np.ndarray | list) -> torch.Tensor:
    """PIL image(s) or HWC/NHWC uint8 array(s) -> float32 NCHW in [-1, 1]."""
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
    return from_uint8(torch.from_numpy(np.stack(arrays)))


def from_uint8(pixels: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 NHWC (on any device, e.g. a training batch already on the GPU) -> float32 NCHW in [-1, 1]."""
    images = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return images.contiguous(memory_format=memory_format)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (rounded, clamped)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(array) for array in to_uint8(images)]
