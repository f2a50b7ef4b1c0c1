"""The IPU-Net objective L = L_embedding + beta * L_pixel (both MSE, beta = 5 in the paper)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LossTerms(NamedTuple):
    total: torch.Tensor
    embedding: torch.Tensor
    pixel: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """For logging: {'total': ..., 'embedding': ..., 'pixel': ...}."""
        return {name: float(value.detach()) for name, value in self._asdict().items()}


class IdentityPreservingLoss(nn.Module):
    """MSE between the identity net's embeddings of SR and HR faces, plus beta times the pixel MSE.

    Pixels are in ipsr's [-1, 1] range; embeddings are FaceNet's L2-normalised 512-D vectors.
    """

    def __init__(self, identity_net: nn.Module, beta: float = 5.0):
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.identity_net = identity_net
        self.beta = beta

    def forward(
        self, sr: torch.Tensor, hr: torch.Tensor, hr_embedding: torch.Tensor | None = None
    ) -> LossTerms:
        if hr_embedding is None:
            with torch.no_grad():
                hr_embedding = self.identity_net(hr)
        embedding = F.mse_loss(self.identity_net(sr), hr_embedding)
        pixel = F.mse_loss(sr, hr)
        return LossTerms(embedding + self.beta * pixel, embedding, pixel)
