"""The frozen identity network: facenet-pytorch's InceptionResnetV1 behind ipsr's image convention.

Frozen means its *parameters* never change (eval mode, requires_grad False); gradients still flow through it
to its *input*, which is how L_embedding trains the generator. (The paper's official TF code computes the SR
embedding outside the gradient tape, so there its identity loss never reaches the generator.)
"""

from __future__ import annotations

import torch
from facenet_pytorch import InceptionResnetV1
from torch import nn

from .degradation import resize
from .weights import load_identity_weights

FACENET_SIZE = (160, 160)
EMBEDDING_DIM = 512


class IdentityNet(nn.Module):
    """[-1, 1] RGB faces of any size -> L2-normalised 512-D FaceNet embeddings."""

    def __init__(self, weights: str = "casia-webface-offline", *, allow_random: bool = False):
        super().__init__()
        self.net = InceptionResnetV1(pretrained=None, classify=False)
        state_dict, self.weights_sha256 = load_identity_weights(weights, allow_random=allow_random)
        if state_dict is not None:
            self.net.load_state_dict(state_dict, strict=True)
        self.net.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "IdentityNet":
        # Always eval: BatchNorm statistics and dropout of the identity net are part of its weights.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # FaceNet's fixed standardisation (p - 127.5) / 128 of 0-255 pixels is x * 127.5 / 128 for x in [-1, 1].
        return self.net(resize(images, FACENET_SIZE) * (127.5 / 128.0))
