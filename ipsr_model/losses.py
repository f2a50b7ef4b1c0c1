"""The IPU-Net objective L = L_embedding + beta * L_pixel (paper Eq. 1-3, beta = 5).

The paper reads two ways on L_embedding: its text and released code take the per-element MSE of the identity
net's embeddings ("mse", the default: chosen by measurement on unseen identities, bench/RESULTS.md), its Eq. 2 the
batch mean of the per-sample Euclidean distance ||E_SR - E_HR|| ("distance", ~500× larger on 512-D unit vectors,
so at beta = 5 it takes ~99 % of the gradient and the generator learns to fool that one network). Also 1 - cosine
and "none" (pixel only, the paper's ablation). L_pixel is the pixel MSE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_LOSSES = ("distance", "mse", "cosine", "none")


class LossTerms(NamedTuple):
    total: torch.Tensor
    embedding: torch.Tensor
    pixel: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """For logging: {'total': ..., 'embedding': ..., 'pixel': ...}."""
        return {name: float(value.detach()) for name, value in self._asdict().items()}


def embedding_distance(sr: torch.Tensor, hr: torch.Tensor, kind: str) -> torch.Tensor:
    """L_embedding between two [N, D] embedding batches."""
    if kind == "distance":
        # vector_norm's gradient at a zero difference is 0 (a subgradient), not NaN.
        return torch.linalg.vector_norm(sr - hr, dim=1).mean()
    if kind == "mse":
        return F.mse_loss(sr, hr)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(sr, hr, dim=1)).mean()
    raise ValueError(f"embedding loss must be one of {', '.join(EMBEDDING_LOSSES)}, got {kind!r}")


def random_view(jitter: float, *batches: torch.Tensor) -> list[torch.Tensor]:
    """Each face shifted by up to ``jitter`` of its side, scaled by 1 ± ``jitter`` and flipped at random; face i of
    every batch gets the same view.

    Fed to the identity net in place of the raw faces, so the generator is rewarded for identity that survives
    small changes of view, not for pixel patterns that move one network's embedding (an adversarial shortcut).
    Bilinear resampling keeps it differentiable.
    """
    first = batches[0]
    n = first.shape[0]
    u = torch.rand(n, 4, device=first.device) * 2 - 1
    scale = 1.0 + jitter * u[:, 0]
    theta = torch.zeros(n, 2, 3, device=first.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * torch.where(u[:, 1] < 0, -1.0, 1.0), scale
    theta[:, :, 2] = 2 * jitter * u[:, 2:]  # affine_grid coordinates span [-1, 1]: 2 * jitter = jitter of a side
    grid = F.affine_grid(theta, list(first.shape), align_corners=False)
    return [
        F.grid_sample(b, grid.to(b.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
        for b in batches
    ]


class IdentityPreservingLoss(nn.Module):
    """L_embedding(identity_net(SR), identity_net(HR)) + beta * MSE(SR, HR).

    Pixels are in ipsr's [-1, 1] range; embeddings are the identity net's L2-normalised vectors. With
    ``embedding_loss="none"`` the identity net is not run at all (pixel-only ablation). ``jitter`` > 0 embeds a
    random view (``random_view``) of each SR/HR pair instead of the faces as they are. Several identity nets (a
    list) give the mean of their L_embedding terms, so that no single network's quirks define identity; precomputed
    HR embeddings then belong to the first.
    """

    def __init__(
        self,
        identity_net: nn.Module | list[nn.Module] | None,
        beta: float = 5.0,
        embedding_loss: str = "mse",
        jitter: float = 0.0,
    ):
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 0 <= jitter < 0.5:
            raise ValueError(f"identity jitter must be in [0, 0.5), got {jitter}")
        if embedding_loss not in EMBEDDING_LOSSES:
            raise ValueError(f"embedding loss must be one of {', '.join(EMBEDDING_LOSSES)}, got {embedding_loss!r}")
        nets = [] if identity_net is None else identity_net if isinstance(identity_net, list) else [identity_net]
        if not nets and embedding_loss != "none":
            raise ValueError(f"embedding loss {embedding_loss!r} needs an identity net")
        self.identity_nets = nn.ModuleList(nets)
        self.beta = beta
        self.embedding_loss = embedding_loss
        self.jitter = jitter

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, hr_embedding: torch.Tensor | None = None) -> LossTerms:
        pixel = F.mse_loss(sr, hr)
        if self.embedding_loss == "none":
            embedding = pixel.new_zeros(())
        else:
            if self.jitter and hr_embedding is None:  # one random view per SR/HR pair
                sr, hr = random_view(self.jitter, sr, hr)
            elif self.jitter:  # HR embeddings given (precomputed): only SR can be viewed anew
                (sr,) = random_view(self.jitter, sr)
            terms = []
            for i, net in enumerate(self.identity_nets):
                target = hr_embedding if i == 0 and hr_embedding is not None else None
                if target is None:
                    with torch.no_grad():
                        target = net(hr)
                terms.append(embedding_distance(net(sr).float(), target.float(), self.embedding_loss))
            embedding = torch.stack(terms).mean()
        return LossTerms(embedding + self.beta * pixel, embedding, pixel)
