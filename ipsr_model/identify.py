"""Identification compute: bicubic-upsampled probes → U-Net → back-projection toward the LR probe → FaceNet → best
cosine per gallery identity → top-k.

Pure torch, the hot path of ``ipsr serve`` (its deployment calls `identify_batch` per batch) and what
``bench/device_check.py`` times. A gallery is a matrix of unit embeddings with a dense identity code per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ipsr_model.degradation import back_project


class Searchable(Protocol):
    """A gallery as a batch searches it (``serving.index.GalleryIndex`` is one)."""

    embeddings: torch.Tensor  # [N, D] unit rows, float32 or float16
    codes: torch.Tensor  # [N] long: each row's identity
    names: list[str]  # identity code → name


@dataclass
class Probe:
    """One probe of a batch: a 128×128 face in [-1, 1] (bicubic-upscaled when it was low-resolution)."""

    image: torch.Tensor
    super_resolve: bool
    lr: torch.Tensor | None = None  # [3, h, w]: the LR probe at its own size, when it was one
    back_projection: int = 0  # steps toward ``lr`` after the generator (`degradation.back_project`)
    concat_bicubic: bool = False
    gallery: Searchable | None = None  # None: super-resolution only, no search
    top_k: int = 0
    want_image: bool = False


def embed(identity_net: nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """[N, 3, 128, 128] faces in [-1, 1] → [N, D] float32 unit embeddings."""
    return F.normalize(identity_net(faces).float(), dim=1)


def best_per_identity(
    query: torch.Tensor,
    gallery: torch.Tensor,
    codes: torch.Tensor,
    identities: int,
    *,
    chunk: int = 65536,
    also: torch.Tensor | None = None,
    also_rows: list[int] | None = None,
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
        if also is not None and also_rows:
            scores[also_rows] = (scores[also_rows] + (also.to(block.dtype) @ block.T).float()) / 2
        best.scatter_reduce_(1, codes[start : start + chunk].expand_as(scores), scores, reduce="amax")
    return best


def identify_batch(
    generator: nn.Module, identity_net: nn.Module, probes: list[Probe], device: torch.device, chunk: int = 65536
) -> list[dict]:
    """Per probe ``{"super_resolved", "image" (when wanted: [1, 3, 128, 128] on ``device``), "matches" (when it has a
    gallery)}``: the super-resolved rows in one generator call, one FaceNet pass, one chunked search per gallery."""
    with torch.inference_mode():
        bicubic = torch.stack([p.image for p in probes]).to(device)
        faces = bicubic.clone()
        sr_rows = [i for i, p in enumerate(probes) if p.super_resolve]
        if sr_rows:
            faces[sr_rows] = generator(bicubic[sr_rows]).to(faces.dtype)
            _back_project(faces, probes, sr_rows)
        out: list[dict[str, Any]] = [{"super_resolved": p.super_resolve} for p in probes]
        for i, p in enumerate(probes):
            if p.want_image:
                out[i]["image"] = faces[i : i + 1]
        wanted = [i for i, p in enumerate(probes) if p.gallery is not None]
        if not wanted:
            return out
        # From here on, probes are numbered j over `wanted` (the ones searched).
        embeddings = embed(identity_net, faces[wanted])
        concat = [j for j, i in enumerate(wanted) if probes[i].concat_bicubic and probes[i].super_resolve]
        also = embed(identity_net, bicubic[[wanted[j] for j in concat]]) if concat else None
        found = _search([probes[i] for i in wanted], embeddings, also, concat, chunk)
        for i, matches in zip(wanted, found):
            out[i]["matches"] = matches
        return out


def _back_project(faces: torch.Tensor, probes: list[Probe], rows: list[int]) -> None:
    """Rows ``rows`` of ``faces`` back-projected in place toward their probes' LR images, one call per LR size."""
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        lr = probes[i].lr
        if lr is not None and probes[i].back_projection:
            groups.setdefault((tuple(lr.shape), probes[i].back_projection), []).append(i)
    for (_, steps), group in groups.items():
        low = torch.stack([probes[i].lr for i in group]).to(faces.device, faces.dtype)  # type: ignore[misc]
        faces[group] = back_project(faces[group], low, steps)


def _search(
    probes: list[Probe], embeddings: torch.Tensor, also: torch.Tensor | None, concat: list[int], chunk: int
) -> list[list[dict]]:
    """Top-k matches of each probe: one `best_per_identity` per gallery (grouped by object: one gallery read once per
    batch); ``also`` holds the bicubic embeddings of probes ``concat``, in that order."""
    slot = {j: b for b, j in enumerate(concat)}
    groups: dict[int, list[int]] = {}
    for j, probe in enumerate(probes):
        groups.setdefault(id(probe.gallery), []).append(j)
    found: list[list[dict]] = [[] for _ in probes]
    for rows in groups.values():  # r numbers a group's rows
        gallery = probes[rows[0]].gallery
        assert gallery is not None  # only probes with a gallery are searched
        both = [(r, slot[j]) for r, j in enumerate(rows) if j in slot]
        best = best_per_identity(
            embeddings[rows],
            gallery.embeddings,
            gallery.codes,
            len(gallery.names),
            chunk=chunk,
            also=also[[b for _, b in both]] if both and also is not None else None,
            also_rows=[r for r, _ in both],
        )
        scores, ids = best.topk(min(max(probes[j].top_k for j in rows), best.shape[1]), dim=1)
        for r, j in enumerate(rows):
            k = probes[j].top_k
            found[j] = [
                {"rank": rank + 1, "identity": gallery.names[c], "score": round(float(s), 6)}
                for rank, (s, c) in enumerate(zip(scores[r, :k].tolist(), ids[r, :k].tolist()))
            ]
    return found
