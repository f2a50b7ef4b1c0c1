"""Dataset adapters for `ipsr evaluate`: identity-folder layouts → gallery + probe columns (the paper's protocols).

Every protocol yields an HR gallery (one face per identity, 128×128, ipsr's [-1, 1] convention) and columns of
probes. Synthetic protocols (AR, LFW, folder) hold HR probes that the evaluation degrades to each column's size;
SCface holds natural low-resolution probes, already brought to 128×128 (64×64, then bicubic up, as the paper).

- ``ar`` (Table I): gallery = first image (or ``gallery_pattern``), probe = the second (or ``probe_pattern``).
- ``lfw`` (Table IV): identities with ≥ 2 images, gallery = first image, every other image a probe.
- ``folder``: like lfw, with AR sizes by default: any identity-folder dataset.
- ``scface`` (Tables II–III): ``DIR/gallery/<identity>/`` mugshots; probes in ``DIR/probes/<group>/<identity>/``
  (one group per camera distance) or listed in a CSV (``path,identity,group``, paths relative to DIR).
  Protocol 2: ``gallery_group`` takes the gallery from one group (treated like the probes) and the rest as columns.

Input faces are expected cropped (ORL, SCface face crops) or aligned (the output of ``ipsr preprocess``, which
``DIR/_SUCCESS`` + ``DIR/data/*.parquet`` identifies); folder images are centre-square-cropped to 128×128.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ipsr_model.degradation import parse_size, resize
from ipsr_model.errors import UserError
from ipsr_model.images import square_face, to_tensor
from ipsr_model.unet import IMAGE_SIZE
from ipsr_platform import aligned
from ipsr_platform.faces import IMAGE_SUFFIXES, decode_face, identity_files, natural_key, read_image
from ipsr_platform.storage import Storage, is_s3, join, normalize

log = logging.getLogger(__name__)

SCFACE_PROBE_SIDE = 64  # SCface probes: resized to 64×64, then bicubic to 128×128 (the paper's setting)


@dataclass
class ProbeColumn:
    name: str  # table column: a size ("16x12") or an SCface distance group ("d1")
    images: torch.Tensor  # N×3×128×128: HR faces (size set) or natural LR faces brought to 128² (size None)
    labels: torch.Tensor
    size: tuple[int, int] | None  # degrade HR probes to this (H, W); None: already low resolution
    lr: torch.Tensor | None = None  # natural LR probes (size None) at their own size: what restoring agrees with


@dataclass
class Protocol:
    name: str
    gallery: torch.Tensor
    gallery_labels: torch.Tensor
    columns: list[ProbeColumn]
    identities: list[str]  # label → identity name
    gallery_low: torch.Tensor | None = None  # SCface protocol 2: the LR gallery at its own size (restored like probes)
    note: str = ""

    @property
    def gallery_lr(self) -> bool:
        return self.gallery_low is not None

    @property
    def synthetic(self) -> bool:
        return all(column.size is not None for column in self.columns)


# ------------------------------------------------------------------------------------------------- reading


@dataclass
class _Face:
    name: str  # file name (for patterns and ordering)
    load: Callable[[], Image.Image]


def _identity_folders(uri: str, storage: Storage) -> dict[str, list[_Face]]:
    """Identity folders (local or s3://): the images directly in each, read when a protocol loads them."""
    if not storage.is_dir(uri):
        raise UserError(f"--data {uri}: no such {'prefix' if is_s3(uri) else 'directory'}")
    out = {}
    for name, entries in identity_files(uri, storage)[0].items():
        images = [e for e in entries if Path(e.base_name).suffix.lower() in IMAGE_SUFFIXES]
        if images:
            out[name] = [_Face(e.base_name, functools.partial(_read_stored, e.path, storage)) for e in images]
    return out


def _aligned_dataset(uri: str, storage: Storage, split: str | None = None) -> dict[str, list[_Face]]:
    """The Parquet output of ``ipsr preprocess`` (already MTCNN-aligned 128×128 PNGs): one split or all."""
    import pyarrow.parquet as pq

    filters = [("split", "=", split)] if split else None
    fs, path = storage.resolve(join(uri, aligned.DATA))
    table = pq.read_table(path, filesystem=fs, columns=["image", "identity", "source"], filters=filters).to_pydict()
    if split and not table["identity"]:
        raise UserError(f"--data {uri}: the {split!r} split is empty (see manifest.json counts)")
    out: dict[str, list[_Face]] = {}
    for png, identity, source in zip(table["image"], table["identity"], table["source"]):
        out.setdefault(identity, []).append(_Face(source, functools.partial(decode_face, png)))
    for faces in out.values():
        faces.sort(key=lambda f: natural_key(Path(f.name)))
    return dict(sorted(out.items()))


def read_identities(data: str | Path, split: str | None = None) -> tuple[dict[str, list[_Face]], str]:
    """identity → faces in natural file order, and which split was read, from identity folders or an ``ipsr
    preprocess`` output (local or s3://).

    A preprocess output is read by split, its held-out ``test`` identities unless ``split`` says otherwise (``all``:
    every split): scoring the identities a model was trained on would flatter it. Identity folders have no split.
    """
    storage, uri = Storage.from_env(), normalize(str(data))
    if aligned.is_committed(uri, storage):
        chosen = split or "test"
        return _aligned_dataset(uri, storage, None if chosen == "all" else chosen), chosen
    if split not in (None, "all"):
        raise UserError(f"--split {split} needs an `ipsr preprocess` output as --data; {data} is not one")
    return _identity_folders(uri, storage), "all"


def _read_stored(uri: str, storage: Storage) -> Image.Image:
    return read_image(uri, storage.read_bytes(uri)) if is_s3(uri) else read_image(uri)  # local: its own OS errors


def _select(identities: dict[str, list[_Face]], globs: str | None) -> dict[str, list[_Face]]:
    if not globs:
        return identities
    patterns = [g.strip() for g in globs.split(",") if g.strip()]
    return {k: v for k, v in identities.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _matching(faces: list[_Face], pattern: str | None) -> list[_Face]:
    return [f for f in faces if fnmatch.fnmatchcase(f.name, pattern)] if pattern else faces


def _faces(faces: list[_Face], side: int = IMAGE_SIZE) -> torch.Tensor:
    return to_tensor([square_face(face.load(), side) for face in faces])


# ------------------------------------------------------------------------------------------------ protocols


def synthetic_protocol(
    name: str,
    root: str | Path,
    sizes: tuple[str, ...],
    *,
    identities: str | None = None,
    gallery_pattern: str | None = None,
    probe_pattern: str | None = None,
    split: str | None = None,
) -> Protocol:
    """AR (one probe per identity), LFW and folder protocols: HR gallery + HR probes, degraded per column."""
    faces_by_identity, split = read_identities(root, split)
    data = _select(faces_by_identity, identities)
    gallery, probes, probe_labels = [], [], []
    names: list[str] = []
    skipped = 0
    for identity, faces in data.items():
        chosen = _matching(faces, gallery_pattern)
        rest = _matching([f for f in faces if f is not chosen[0]], probe_pattern) if chosen else []
        if not rest:
            skipped += 1  # no gallery image or no probe (LFW: identities with a single image are not used)
            continue
        kept = rest[:1] if name == "ar" else rest
        probes += kept
        probe_labels += [len(names)] * len(kept)
        names.append(identity)
        gallery.append(chosen[0])
    if len(names) < 2:
        lacked = f" ({skipped} identities lacked one)" if skipped else ""
        raise UserError(
            f"--data {root}: protocol {name} needs at least 2 identities with a gallery and a probe image "
            f"(identity folders DIR/<identity>/<image>); found {len(names)}{lacked}"
        )
    hr_probes, labels = _faces(probes), torch.tensor(probe_labels)
    columns = [ProbeColumn(size, hr_probes, labels, parse_size(size)) for size in sizes]
    note = f"{len(names)} identities, {len(probes)} probes" + (f", {skipped} identities skipped" if skipped else "")
    if split != "all":
        note += f"; the preprocess output's {split!r} split" + (
            " (held-out identities; --split all for every split)" if split == "test" else ""
        )
    log.info("protocol %s on %s: %s", name, root, note)
    return Protocol(name, _faces(gallery), torch.arange(len(names)), columns, names, note=note)


def _low_resolution(faces: list[_Face]) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural low-resolution faces → 64×64 (PIL bicubic), and those → 128×128 (the same bicubic kernel)."""
    low = _faces(faces, SCFACE_PROBE_SIDE)
    return low, resize(low, (IMAGE_SIZE, IMAGE_SIZE)).clamp_(-1.0, 1.0)


def _probe_groups(root: Path, probe_map: str | None) -> dict[str, dict[str, list[_Face]]]:
    """group → identity → faces, from ``DIR/probes/<group>/<identity>/`` or a ``path,identity,group`` CSV."""
    groups: dict[str, dict[str, list[_Face]]] = {}
    if probe_map:
        map_path = Path(probe_map).expanduser()
        if not map_path.is_file():
            raise UserError(f"--probe-map {map_path}: no such file")
        with open(map_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "identity", "group"} <= set(rows[0]):
            raise UserError(f"--probe-map {map_path}: need a header with columns path,identity,group")
        for row in rows:
            path = root / row["path"]
            if not path.is_file():
                raise UserError(f"--probe-map {map_path}: {path} does not exist")
            groups.setdefault(row["group"], {}).setdefault(row["identity"], []).append(
                _Face(path.name, functools.partial(read_image, path))
            )
        return dict(sorted(groups.items()))
    probes_dir = root / "probes"
    if not probes_dir.is_dir():
        raise UserError(f"--data {root}: scface needs probes/<group>/<identity>/<image> (or --probe-map FILE.csv)")
    folders = sorted(p for p in probes_dir.iterdir() if p.is_dir())
    return {folder.name: _identity_folders(str(folder), Storage()) for folder in folders}


def scface_protocol(
    root: Path,
    *,
    identities: str | None = None,
    gallery_pattern: str | None = None,
    probe_map: str | None = None,
    gallery_group: str | None = None,
) -> Protocol:
    groups = {g: _select(ids, identities) for g, ids in _probe_groups(root, probe_map).items()}
    if gallery_group is not None:  # protocol 2: one distance group is the gallery
        if gallery_group not in groups:
            raise UserError(f"--gallery-group {gallery_group!r}: no such probe group (have {', '.join(groups)})")
        gallery_faces = {k: v[0] for k, v in groups.pop(gallery_group).items()}
    else:
        mugshot_dir = root / "gallery"
        mugshots = _select(_identity_folders(str(mugshot_dir), Storage()), identities) if mugshot_dir.is_dir() else {}
        if not mugshots:
            raise UserError(f"--data {root}: scface needs gallery/<identity>/<mugshot> folders")
        chosen = {identity: _matching(faces, gallery_pattern) for identity, faces in mugshots.items()}
        gallery_faces = {identity: faces[0] for identity, faces in chosen.items() if faces}
    names = sorted(gallery_faces)
    label_of = {name: i for i, name in enumerate(names)}
    columns, dropped = [], 0
    for group, ids in groups.items():
        faces, labels = [], []
        for identity, items in ids.items():
            if identity not in label_of:
                dropped += len(items)  # a probe without a gallery identity can't be ranked
                continue
            faces += items
            labels += [label_of[identity]] * len(items)
        if faces:
            low, up = _low_resolution(faces)
            columns.append(ProbeColumn(group, up, torch.tensor(labels), None, low))
    if len(names) < 2 or not columns:
        raise UserError(f"--data {root}: scface needs ≥ 2 gallery identities and probes of those identities")
    gallery_list = [gallery_faces[n] for n in names]
    gallery_low, gallery = _low_resolution(gallery_list) if gallery_group is not None else (None, _faces(gallery_list))
    note = f"{len(names)} gallery identities, groups {', '.join(c.name for c in columns)}" + (
        f", {dropped} probes without a gallery identity dropped" if dropped else ""
    )
    name = "scface-p2" if gallery_group is not None else "scface"
    return Protocol(name, gallery, torch.arange(len(names)), columns, names, gallery_low=gallery_low, note=note)
