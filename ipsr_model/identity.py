"""The frozen identity network: facenet-pytorch's InceptionResnetV1 behind ipsr's image convention.

Frozen means its *parameters* never change (eval mode, requires_grad False); gradients still flow through it
to its *input*, which is how L_embedding trains the generator. (The paper's official TF code computes the SR
embedding outside the gradient tape, so there its identity loss never reaches the generator.)
"""

from __future__ import annotations

import torch
from torch import nn

from .degradation import resize
from .weights import KERAS_EMBEDDING_DIM, facenet_model, load_identity_weights

FACENET_SIZE = (160, 160)
EMBEDDING_DIM = 512


class IdentityNet(nn.Module):
    """[-1, 1] RGB faces of any size -> L2-normalised FaceNet embeddings (512-D; 128-D for ``ms-celeb-keras``)."""

    def __init__(self, weights: str = "casia-webface-offline", *, allow_random: bool = False):
        super().__init__()
        state_dict, self.weights_sha256 = load_identity_weights(weights, allow_random=allow_random)
        self.embedding_dim = EMBEDDING_DIM if state_dict is None else state_dict["last_linear.weight"].shape[0]
        self.net = facenet_model(self.embedding_dim)
        if state_dict is not None:
            self.net.load_state_dict(state_dict, strict=True)
        # Sandberg's 2017 128-D models (the paper's MS-Celeb-1M net) were trained on per-image standardised faces
        # ("prewhiten"); his 2018 512-D models on the fixed (p - 127.5) / 128.
        self.prewhiten = self.embedding_dim == KERAS_EMBEDDING_DIM
        self.net.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> IdentityNet:
        # Always eval: BatchNorm statistics and dropout of the identity net are part of its weights.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        faces = resize(images, FACENET_SIZE)
        if self.prewhiten:
            mean, std = faces.mean(dim=(1, 2, 3), keepdim=True), faces.std(dim=(1, 2, 3), keepdim=True)
            return self.net((faces - mean) / std.clamp_min(1e-5))
        # FaceNet's fixed standardisation (p - 127.5) / 128 of 0-255 pixels is x * 127.5 / 128 for x in [-1, 1].
        return self.net(faces * (127.5 / 128.0))
