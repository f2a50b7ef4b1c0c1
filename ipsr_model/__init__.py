"""IPU-Net model core in pure PyTorch: U-Net generator, multi-scale degradation, frozen FaceNet identity
network, identity-preserving loss and identification metrics. Never imports Ray or MLflow."""

from .degradation import PAPER_SIZES, MultiScaleDegradation, degrade, format_size, parse_size
from .errors import UserError
from .losses import IdentityPreservingLoss, LossTerms
from .unet import IMAGE_SIZE, UNetGenerator

__all__ = [
    "IMAGE_SIZE",
    "PAPER_SIZES",
    "IdentityPreservingLoss",
    "LossTerms",
    "MultiScaleDegradation",
    "UNetGenerator",
    "UserError",
    "degrade",
    "format_size",
    "parse_size",
]
