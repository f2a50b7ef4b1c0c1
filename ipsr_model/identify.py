"""Identification compute: bicubic-upsampled probes → U-Net → FaceNet → best cosine per gallery identity → top-k.

Pure torch, the hot path of ``ipsr serve`` (its deployment calls these functions per batch) and of
``bench/device_check.py``. The gallery is a matrix of unit embeddings with a dense identity code per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embed(identity_net: nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """[N, 3, 128, 128] faces in [-1, 1] → [N, D] float32 unit embeddings."""
    return F.normalize(identity_net(faces).float(), dim=1)


def best_per_identity(query: torch.Tensor, gallery: torch.Tensor, codes: torch.Tensor, identities: int, *,
                      chunk: int = 65536, also: torch.Tensor | None = None, also_rows: list[int] | None = None
                      ) -> torch.Tensor:
    """[P, identities]: each probe's best cosine over each identity's gallery rows, one matmul per chunk.

    ``also`` ([len(also_rows), D]) gives rows ``also_rows`` of the query a second embedding whose cosine is averaged
    with the first (``concat_bicubic``: for unit vectors the cosine of [a ; b] with [g ; g] is the mean of the two
    cosines), so the gallery is never duplicated in memory. The gallery may be fp16: scores are computed in its
    dtype, the per-identity max in float32.
    """
    query = query.to(gallery.dtype)
    best = torch.full((query.shape[0], identities), float("-inf"), device=query.device)
    for start in range(0, gallery.shape[0], chunk):
        block = gallery[start : start + chunk]
        scores = (query @ block.T).float()
        if also_rows:
            scores[also_rows] = (scores[also_rows] + (also.to(block.dtype) @ block.T).float()) / 2
        best.scatter_reduce_(1, codes[start : start + chunk].expand_as(scores), scores, reduce="amax")
    return best


def identify(generator: nn.Module | None, identity_net: nn.Module, bicubic: torch.Tensor, gallery: torch.Tensor,
             codes: torch.Tensor, identities: int, k: int = 5, chunk: int = 65536
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, identity codes) per probe; ``generator`` None identifies the bicubic faces as they are."""
    with torch.inference_mode():
        faces = bicubic if generator is None else generator(bicubic).to(bicubic.dtype)
        best = best_per_identity(embed(identity_net, faces), gallery, codes, identities, chunk=chunk)
        return best.topk(min(k, identities), dim=1)
