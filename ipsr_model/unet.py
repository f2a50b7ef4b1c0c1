"""The IPU-Net generator: a pix2pix-style U-Net for 128x128 faces.

7 down blocks take 128x128 to a 1x1 bottleneck, 7 up blocks bring it back; the output of down block i is
concatenated into the input of up block n-i+1 (6 skips). Layer choices follow pix2pix's `UnetGenerator`:
no BatchNorm on the first down block (it sees raw pixels) nor on the bottleneck block (BatchNorm over a 1x1
map fails for batch size 1 in training), dropout 0.5 on the innermost up blocks, tanh output in [-1, 1].

``residual=True`` adds one operation at the output: SR = clamp(input + U-Net(input), -1, 1), with the last layer
initialised to zero, so an untrained generator *is* bicubic and training only has to learn the missing detail.
The network is the paper's either way; the flag travels in the state dict (``_extra_state``).
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 7
IMAGE_SIZE = 2**DEPTH  # 128: every down block halves the side, the bottleneck is 1x1
DROPOUT_BLOCKS = 3
CHANNELS = 3  # RGB in and out


class DownBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, *, batch_norm: bool, bottleneck: bool = False):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=not batch_norm),
            *([nn.BatchNorm2d(out_channels)] if batch_norm else []),
            # pix2pix feeds the bottleneck to the decoder through a ReLU; every other encoder output is LeakyReLU.
            nn.ReLU(True) if bottleneck else nn.LeakyReLU(0.2, True),
        )


class UpBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, *, dropout: bool):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            *([nn.Dropout(0.5)] if dropout else []),
            nn.ReLU(True),
        )


class UNetGenerator(nn.Module):
    """128x128 RGB in [-1, 1] -> 128x128 RGB in [-1, 1].

    `base_channels=64` is the paper's width; small widths (4-16) are for CPU smoke runs.
    The `DROPOUT_BLOCKS` innermost up blocks use dropout 0.5 (pix2pix: the first three decoder layers).
    """

    def __init__(self, base_channels: int = 64, *, residual: bool = False):
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        self.base_channels = base_channels
        self.residual = residual
        widths = [base_channels * min(2**i, 8) for i in range(DEPTH)]  # base 64: 64, 128, ..., 512 (pix2pix)

        self.down = nn.ModuleList(
            DownBlock(previous, width, batch_norm=0 < i < DEPTH - 1, bottleneck=i == DEPTH - 1)
            for i, (previous, width) in enumerate(zip([CHANNELS, *widths], widths))
        )

        # Up block j (j = 0 innermost) outputs the width of down block DEPTH-2-j, whose output is then
        # concatenated to it; the last up block maps to the image.
        self.up = nn.ModuleList()
        for j in range(DEPTH - 1):
            skip_width = widths[DEPTH - 2 - j]
            in_width = widths[-1] if j == 0 else 2 * widths[DEPTH - 1 - j]
            self.up.append(UpBlock(in_width, skip_width, dropout=j < DROPOUT_BLOCKS))
        last = nn.ConvTranspose2d(2 * widths[0], CHANNELS, kernel_size=4, stride=2, padding=1)
        self.to_image = nn.Sequential(last, nn.Tanh())
        if residual:  # start as the identity map on the bicubic input
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # bias=True: never None

    def get_extra_state(self) -> dict:
        return {"residual": self.residual}

    def set_extra_state(self, state: dict) -> None:
        if bool(state.get("residual", False)) != self.residual:  # RuntimeError, like load_state_dict's own
            raise RuntimeError(
                f"state dict is for residual={state.get('residual')}, this UNetGenerator has residual={self.residual}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"UNetGenerator expects {IMAGE_SIZE}x{IMAGE_SIZE} inputs, got {tuple(x.shape[-2:])}")
        image, skips = x, []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is the decoder's input, not a skip
        for block in self.up:
            x = torch.cat([block(x), skips.pop()], dim=1)
        out = self.to_image(x)
        return (image + out).clamp(-1.0, 1.0) if self.residual else out
