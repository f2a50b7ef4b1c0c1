"""The training checkpoint on disk: one home for its writer (jobs/train_worker.py) and its readers (jobs/train.py,
ipsr_platform/models.py).

A checkpoint is a directory holding ``state.pt``: a dict with ``format``, ``generator`` (the U-Net's state dict on
the CPU), ``optimizer``, ``scheduler``, ``step``, ``rng`` and provenance. Loads are ``weights_only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ipsr_model.unet import UNetGenerator

STATE_FILE = "state.pt"
FORMAT = 2  # 2: + the learning-rate scheduler state


def save(directory: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (without ``format``: this module stamps it) as the checkpoint in ``directory``."""
    torch.save({"format": FORMAT, **state}, Path(directory) / STATE_FILE)


def load(directory: str | Path) -> dict[str, Any]:
    """A checkpoint directory's training state; a checkpoint of another format is refused."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise RuntimeError(f"checkpoint {directory}: format {state.get('format')!r}, expected {FORMAT}")
    return state


def cpu_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """``module``'s state dict on the CPU; ``_extra_state`` (the U-Net's residual flag) kept as it is."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}


def generator_from_state(state: dict[str, Any]) -> UNetGenerator:
    """The U-Net a state dict describes: the width read off the first convolution, the residual flag off
    ``_extra_state`` (absent before residual outputs existed: plain). Raises ValueError when it is not one."""
    first = state.get("down.0.0.weight") if isinstance(state, dict) else None
    if not isinstance(first, torch.Tensor):
        raise ValueError("not a UNetGenerator state dict (no down.0.0.weight)")
    extra = state.get("_extra_state")
    generator = UNetGenerator(first.shape[0], residual=bool(isinstance(extra, dict) and extra.get("residual")))
    try:
        generator.load_state_dict(state if extra is not None else {**state, "_extra_state": {"residual": False}})
    except RuntimeError as err:
        raise ValueError(f"does not fit UNetGenerator ({str(err).strip().splitlines()[0]})") from None
    return generator
