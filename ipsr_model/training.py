"""One optimisation step of IPU-Net, shared by the smoke run, the benches and the Ray Train job."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .degradation import MultiScaleDegradation
from .losses import IdentityPreservingLoss, LossTerms

LR_SCHEDULES = ("constant", "cosine")


class StepStats(NamedTuple):
    """The loss terms of one step and the norm of each term's gradient at the generator's output."""

    total: torch.Tensor
    embedding: torch.Tensor
    pixel: torch.Tensor
    grad_embedding: torch.Tensor  # ||dL_embedding / dSR||
    grad_pixel: torch.Tensor  # ||d(beta * L_pixel) / dSR||

    def as_floats(self) -> dict[str, float]:
        return LossTerms.as_floats(self)  # type: ignore[arg-type]  # same field names: the same conversion


def grad_shares(grad_embedding: torch.Tensor, grad_pixel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each term's share of the gradient entering the generator (norms; the two shares sum to 1)."""
    both = (grad_embedding + grad_pixel).clamp_min(1e-30)
    return grad_embedding / both, grad_pixel / both


def make_optimizer(generator: nn.Module, lr: float = 2e-4, fused: bool | None = None) -> torch.optim.Adam:
    """Paper / official code: Adam, lr 2e-4, beta1 0.5."""
    return torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999), fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0, schedule: str = "constant"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/warmup to lr, then constant or cosine down to 10 % of lr at ``total_steps``.

    Warm-up keeps Adam's first, badly estimated steps small: with a residual output they would otherwise push the
    generator away from bicubic before its gradient statistics settle.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_step(
    generator: nn.Module,
    loss_fn: IdentityPreservingLoss,
    optimizer: torch.optim.Optimizer,
    hr: torch.Tensor,
    degradation: MultiScaleDegradation,
    rng: torch.Generator | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    hr_embedding: torch.Tensor | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> StepStats:
    """Degrade the HR batch per sample, super-resolve it, and take one optimiser step on L.

    The loss is taken on a detached copy of SR so that each term's gradient at the generator's output can be
    measured on its own (the identity term's needs the backward through FaceNet the step does anyway; the pixel
    term's is elementwise), then their sum runs back through the generator once: the same update as
    ``L.backward()``, plus the evidence that the identity term is alive. Degradation stays float32 (the LR input
    is the experiment's definition); the generator and FaceNet run under ``autocast_dtype`` when given (GPU bf16).
    No host sync: every returned value stays on the device.
    """
    generator.train()
    with torch.no_grad():
        lr, _ = degradation(hr, rng)
    with torch.autocast(hr.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        sr = generator(lr)
        out = sr.detach().float().requires_grad_(True)
        terms = loss_fn(out, hr, hr_embedding)
    grad_pixel = torch.autograd.grad(loss_fn.beta * terms.pixel, out)[0]
    grad_embedding = (
        torch.autograd.grad(terms.embedding, out)[0] if terms.embedding.requires_grad else torch.zeros_like(out)
    )
    optimizer.zero_grad(set_to_none=True)
    sr.backward((grad_embedding + grad_pixel).to(sr.dtype))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepStats(
        terms.total.detach(), terms.embedding.detach(), terms.pixel.detach(), grad_embedding.norm(), grad_pixel.norm()
    )
