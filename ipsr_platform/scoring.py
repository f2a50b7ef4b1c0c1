"""The one scorer: rank of every probe's identity per (recognizer, method, probe column) of a protocol.

`ipsr evaluate` builds its tables, intervals and paired tests from it; training's validation and `ipsr smoke` read
rank-1 off it through `rank1_by_size`, so the three report the same number for the same faces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ipsr_model.degradation import back_project, degrade, format_size, resize
from ipsr_model.metrics import cosine_similarity, fidelity, probe_ranks
from ipsr_platform import console
from ipsr_platform.protocols import ProbeColumn, Protocol

HR, BICUBIC = "hr", "bicubic"
Embedder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Method:
    label: str  # table row / metric key
    restore: torch.nn.Module | None = None  # a generator; None for hr and bicubic
    spec: str = ""
    model: Any = None  # ipsr_platform.models.LoadedGenerator for generators
    group: str | None = None  # models given as GROUP=SPEC are seeds of one configuration (seed_table)
    back_projection: int = 0  # steps toward the LR probe after `restore` (probes degraded here only)


class SampleGrid(NamedTuple):
    rows: list[str]  # the identity of each sample probe
    columns: list[tuple[str, torch.Tensor]]  # (title, [rows, 3, 128, 128]) left to right


class Scores(NamedTuple):
    ranks: dict[tuple[str, str, str], torch.Tensor]  # (recognizer, method, column) → [P] rank of the true identity
    samples: dict[str, SampleGrid]  # column → its first probes as LR input | each method | HR
    fidelity: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]  # (method, column) → [P] PSNR dB, [P] SSIM


@torch.no_grad()
def _embed(recognizer: Embedder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([F.normalize(recognizer(chunk).float(), dim=1) for chunk in images.split(batch_size)])


@torch.no_grad()
def _restore(method: Method, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    assert method.restore is not None, method.label
    return torch.cat([method.restore(chunk.contiguous()).float().clamp(-1, 1) for chunk in images.split(batch_size)])


@torch.no_grad()
def score(
    protocol: Protocol,
    methods: list[Method],
    recognizers: dict[str, Embedder],
    *,
    batch_size: int = 32,
    concat_bicubic: bool = False,
    grid_faces: int = 0,
    progress: bool = True,
) -> Scores:
    """Per (recognizer, method label, column) the rank of every probe's true identity (0 = rank-1 hit; the CMC,
    intervals and paired tests all derive from it), per column sample images per method (first faces), and for
    degraded HR probes each restored face's PSNR and SSIM against its HR original (bicubic and every model).

    With ``concat_bicubic`` a generator's probe embedding is [bicubic ; SR] (each L2-normalised) and its gallery
    embedding [HR ; HR] (SCface protocol 2: [bicubic ; SR] of the gallery too), as the paper does for SCface.
    """
    gallery = _gallery_embeddings(protocol, methods, recognizers, batch_size, concat_bicubic)
    # HR probes (synthetic protocols) are the same faces in every column: embed them once.
    hr_probes = {
        r: _embed(recognizer, protocol.columns[0].images, batch_size) for r, recognizer in recognizers.items()
    } if any(m.label == HR for m in methods) else {}  # fmt: skip
    ranks: dict[tuple[str, str, str], torch.Tensor] = {}
    samples: dict[str, SampleGrid] = {}
    quality: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    total = sum(len(column.images) for column in protocol.columns)
    bar = console.progress(f"evaluate {protocol.name}", total, "probes") if progress else None
    with bar or contextlib.nullcontext(lambda n: None) as advance:
        for column in protocol.columns:
            if grid_faces:
                samples[column.name] = _sample_grid(protocol, column, grid_faces, methods, batch_size)
            probes = _column_probes(column, methods, recognizers, batch_size, concat_bicubic, quality, advance)
            for rec_name in recognizers:
                for method in methods:
                    queries = hr_probes[rec_name] if method.label == HR else probes[rec_name, method.label]
                    similarity = cosine_similarity(queries, gallery[rec_name, method.label])
                    ranks[rec_name, method.label, column.name] = probe_ranks(
                        similarity, column.labels, protocol.gallery_labels
                    )
    measured = {
        key: (torch.cat([p for p, _ in parts]), torch.cat([q for _, q in parts])) for key, parts in quality.items()
    }
    return Scores(ranks, samples, measured)


def _transform(
    method: Method, images: torch.Tensor, size: tuple[int, int] | None, batch_size: int, lr: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``method`` makes of HR ``images`` degraded to ``size``, or (``size`` None) of natural LR probes already
    brought to 128², whose own-size images ``lr`` are, when given, what back-projection makes the output agree with."""
    low = degrade(images, size) if size is not None else images
    if method.restore is None:
        return low
    restored = _restore(method, low, batch_size)
    if not method.back_projection:
        return restored
    lr = resize(images, size) if size is not None else lr
    return restored if lr is None else back_project(restored, lr, method.back_projection)


def _gallery_embeddings(
    protocol: Protocol, methods: list[Method], recognizers: dict[str, Embedder], batch_size: int, concat_bicubic: bool
) -> dict[tuple[str, str], torch.Tensor]:
    """(recognizer, method label) → gallery embeddings: one set per recognizer for an HR gallery; per method
    when it is low resolution."""
    gallery: dict[tuple[str, str], torch.Tensor] = {}
    for rec_name, recognizer in recognizers.items():
        base = _embed(recognizer, protocol.gallery, batch_size)
        for method in methods:
            own = base
            if protocol.gallery_lr and method.restore is not None:
                restored = _transform(method, protocol.gallery, None, batch_size, protocol.gallery_low)
                own = _embed(recognizer, restored, batch_size)
            gallery[rec_name, method.label] = (
                torch.cat([base, own], 1) if concat_bicubic and method.restore is not None else own
            )
    return gallery


def _column_probes(
    column: ProbeColumn,
    methods: list[Method],
    recognizers: dict[str, Embedder],
    batch_size: int,
    concat_bicubic: bool,
    quality: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]],
    advance: Callable[[int], Any],
) -> dict[tuple[str, str], torch.Tensor]:
    """(recognizer, method label) → one column's probe embeddings, streamed in batches: degrade, restore with
    every model, embed with every recognizer. Appends each batch's fidelity to ``quality`` (HR originals only)."""
    probes: dict[tuple[str, str], list[torch.Tensor]] = {}
    for start in range(0, len(column.images), batch_size):
        chunk = column.images[start : start + batch_size]
        lr = None if column.lr is None else column.lr[start : start + batch_size]
        images = {m.label: _transform(m, chunk, column.size, batch_size, lr) for m in methods if m.label != HR}
        if column.size is not None:  # the probes are HR originals: fidelity of what the recognizer sees
            for label, restored in images.items():
                quality.setdefault((label, column.name), []).append(fidelity(restored, chunk))
        for rec_name, recognizer in recognizers.items():
            embedded = {label: _embed(recognizer, batch, batch_size) for label, batch in images.items()}
            for label, value in embedded.items():
                if concat_bicubic and label != BICUBIC:
                    value = torch.cat([embedded[BICUBIC], value], 1)
                probes.setdefault((rec_name, label), []).append(value)
        advance(len(chunk))
    return {key: torch.cat(parts) for key, parts in probes.items()}


def _sample_grid(
    protocol: Protocol, column: ProbeColumn, faces: int, methods: list[Method], batch_size: int
) -> SampleGrid:
    """What a reader needs to judge a restoration, for the first probe of each of the first ``faces`` people (six
    photos of one person say less): the pixels the model was given (nearest-neighbour enlarged, so the low
    resolution shows), bicubic, every model, and the HR original when there is one."""
    picks: dict[int, int] = {}  # identity → its first probe
    for i, label in enumerate(column.labels.tolist()):
        picks.setdefault(label, i)
        if len(picks) == faces:
            break
    hr = column.images[list(picks.values())]
    lr = None if column.lr is None else column.lr[list(picks.values())]
    restored = {m.label: _transform(m, hr, column.size, batch_size, lr) for m in methods if m.label != HR}
    rows = [protocol.identities[label] for label in picks]
    if column.size is None:  # natural low-resolution probes (SCface): no HR original exists
        return SampleGrid(
            rows, [("probe" if label == BICUBIC else label, images) for label, images in restored.items()]
        )
    low = F.interpolate(resize(hr, column.size), size=hr.shape[-2:], mode="nearest").clamp(-1, 1)
    return SampleGrid(rows, [(f"LR {column.name}", low), *restored.items(), ("HR", hr)])


def rank1_table(
    results: dict, recognizer: str, methods: list[Method], columns: list[str]
) -> dict[str, dict[str, float]]:
    """method → column → rank-1, plus the mean over the columns."""
    table = {}
    for method in methods:
        row = {c: float((results[recognizer, method.label, c] == 0).float().mean()) for c in columns}
        row["mean"] = sum(row.values()) / len(columns)
        table[method.label] = row
    return table


def rank1_by_size(
    recognizer: Embedder,
    gallery: torch.Tensor,
    probes: torch.Tensor,
    labels: torch.Tensor,
    sizes: tuple[tuple[int, int], ...],
    restore: torch.nn.Module | None = None,
) -> dict[str, float]:
    """AR-style rank-1 (gallery and probes: one HR face per identity, in ``labels`` order) of HR probes ("HR")
    and of probes degraded to each size ("16x12", …), restored by ``restore`` or left bicubic."""
    columns = [ProbeColumn(format_size(size), probes, labels, size) for size in sizes]
    protocol = Protocol("ar", gallery, labels, columns, [str(i) for i in labels.tolist()])
    methods = [Method(HR), Method("model", restore) if restore is not None else Method(BICUBIC)]
    table = rank1_table(
        score(protocol, methods, {"r": recognizer}, progress=False).ranks, "r", methods, [c.name for c in columns]
    )
    return {"HR": table[HR][columns[0].name]} | {c.name: table[methods[1].label][c.name] for c in columns}
