"""IPU-Net model core in pure PyTorch: U-Net generator, multi-scale degradation, frozen FaceNet identity
network, identity-preserving loss and identification metrics. Never imports Ray or MLflow.

The names below load lazily: `ipsr_model.errors` is imported by every Ray task of the jobs (for UserError),
and importing torch there would cost each worker process ~1 s for nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IMAGE_SIZE": "unet",
    "UNetGenerator": "unet",
    "PAPER_SIZES": "degradation",
    "MultiScaleDegradation": "degradation",
    "degrade": "degradation",
    "format_size": "degradation",
    "parse_size": "degradation",
    "IdentityPreservingLoss": "losses",
    "LossTerms": "losses",
    "UserError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
