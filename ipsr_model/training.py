"""One optimisation step of IPU-Net, shared by the smoke run and the Ray Train job."""

from __future__ import annotations

import torch
from torch import nn

from .degradation import MultiScaleDegradation
from .losses import IdentityPreservingLoss, LossTerms

# Paper / official code: Adam, lr 2e-4, beta1 0.5.
DEFAULT_LR = 2e-4
DEFAULT_BETAS = (0.5, 0.999)


def make_optimizer(generator: nn.Module, lr: float = DEFAULT_LR) -> torch.optim.Adam:
    return torch.optim.Adam(generator.parameters(), lr=lr, betas=DEFAULT_BETAS)


def training_step(
    generator: nn.Module,
    loss_fn: IdentityPreservingLoss,
    optimizer: torch.optim.Optimizer,
    hr: torch.Tensor,
    degradation: MultiScaleDegradation,
    rng: torch.Generator | None = None,
) -> LossTerms:
    """Degrade the HR batch per sample, super-resolve it, and take one optimiser step on L."""
    generator.train()
    lr, _ = degradation(hr, rng)
    terms = loss_fn(generator(lr), hr)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    return terms
