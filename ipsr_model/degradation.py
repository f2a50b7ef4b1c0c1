"""Multi-scale low-resolution degradation: the one implementation used by training, evaluation and serving.

A face is bicubic-downscaled to a low resolution *with antialiasing* and bicubic-upscaled back to 128x128, then
clamped to [-1, 1]. `F.interpolate(mode="bicubic", antialias=True)` uses the same kernel as PIL's
`Image.BICUBIC` (Keys cubic with a = -0.5, support widened by the scale factor when shrinking), so a tensor
degraded here matches `img.resize((w, h), Image.BICUBIC)` within rounding; tests check it against PIL. Without
`antialias` torch uses a = -0.75 and no widening, which aliases badly at 7x6.

`back_project` runs the other way: it makes a restored face agree with the LR image it came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The paper's probe resolutions, H x W.
PAPER_SIZES: tuple[tuple[int, int], ...] = (
    (7, 6),
    (11, 8),
    (14, 12),
    (16, 12),
    (16, 14),
    (16, 16),
    (18, 16),
    (21, 15),
    (32, 32),
    (112, 96),
)


def parse_size(text: str) -> tuple[int, int]:
    """'16x12' -> (16, 12): height first, as everywhere in ipsr."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like HxW (e.g. 16x12), got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return height, width


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL-compatible bicubic resize of an NCHW float batch."""
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def degrade(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every image down to `size` (H, W) and back to its own size (fixed-size mode, for evaluation)."""
    low = resize(images, size)
    return resize(low, (images.shape[-2], images.shape[-1])).clamp_(-1.0, 1.0)


# Back-projection steps after the model at inference: chosen by a rule written before the results (#25,
# bench/back_projection.py): on CelebA val, three pixel-only seeds, it raised mean SFace rank-1 and PSNR.
BACK_PROJECTION_STEPS = 3


def back_project(restored: torch.Tensor, low: torch.Tensor, steps: int = BACK_PROJECTION_STEPS) -> torch.Tensor:
    """``restored`` ([N, C, H, W]) corrected until, shrunk to ``low``'s size, it equals ``low`` ([N, C, h, w], the LR
    images it was restored from): each step adds the upscaled difference (iterative back-projection, Irani & Peleg
    1991). The network never sees the LR size, so its output drifts from the evidence; this only fixes that drift."""
    size, lr_size = (restored.shape[-2], restored.shape[-1]), (low.shape[-2], low.shape[-1])
    if min(lr_size) < 2:  # torch's antialiased bicubic gets a side of 1 wrong (a constant image)
        return restored
    for _ in range(steps):
        restored = (restored + resize(low - resize(restored, lr_size), size)).clamp(-1.0, 1.0)
    return restored


class MultiScaleDegradation:
    """Degrades each sample of a batch to a size drawn uniformly from `sizes` (training mode).

    Works on CPU or GPU tensors; pass a `torch.Generator` (on any device) for reproducible draws. One resize
    pair per distinct size in the batch, so a batch costs at most len(sizes) kernel pairs.
    """

    def __init__(self, sizes: tuple[tuple[int, int], ...] = PAPER_SIZES):
        if not sizes:
            raise ValueError("need at least one degradation size")
        self.sizes = tuple(tuple(s) for s in sizes)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices into `self.sizes`, one per sample, returned on the CPU (they only steer the grouping)."""
        device = generator.device if generator is not None else "cpu"
        return torch.randint(len(self.sizes), (batch_size,), generator=generator, device=device).cpu()

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (degraded images, size index per sample)."""
        choice = self.sample(images.shape[0], generator)
        out = torch.empty_like(images)
        for index in choice.unique().tolist():
            rows = (choice == index).nonzero().squeeze(1)
            if images.device.type == "cuda":  # pinned + non_blocking: a plain copy would sync the host per size
                rows = rows.pin_memory().to(images.device, non_blocking=True)
            out[rows] = degrade(images[rows], self.sizes[index])
        return out, choice


# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
LUMA = (0.299, 0.587, 0.114)


def random_greyscale(faces: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each face of an (N, 3, H, W) batch made greyscale (its luma in all three channels) with probability ``p``:
    a colour-trained residual would otherwise tint greyscale probes (CCTV, ORL) that bicubic leaves grey."""
    grey = torch.rand(len(faces), generator=generator) < p
    if not grey.any():
        return faces
    luma = (faces * torch.tensor(LUMA, dtype=faces.dtype, device=faces.device)[:, None, None]).sum(1, keepdim=True)
    return torch.where(grey.to(faces.device)[:, None, None, None], luma.expand_as(faces), faces)
