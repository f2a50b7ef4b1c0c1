"""`ipsr train`'s data: the preprocess output checked and read (``inspect_dataset``: shards per split, the AR-style
validation pairs), the ``train`` split as a Ray Dataset, and the batch function its Ray Data tasks run (the faces
decoded by ``ipsr_platform.faces.decode_faces``).

Kept free of torch (numpy + Pillow + pyarrow only): every fresh Ray Data worker process imports this module, and a
torch import costs those processes seconds before the first batch reaches training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ipsr_model.errors import UserError, first_line
from ipsr_platform import aligned
from ipsr_platform.faces import decode_faces
from ipsr_platform.storage import Storage, join, normalize

if TYPE_CHECKING:
    from ipsr_platform.config import TrainConfig

REQUIRED_COLUMNS = ("image", "identity", "label", "split", "source")


def decode_batch(batch: dict[str, np.ndarray], embeddings: bool = False) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: column ``image`` (bytes) → column ``hr`` (uint8 128×128×3) and ``label``,
    plus the precomputed ``hr_embedding`` (float32 [512]) when asked."""
    out = {"hr": decode_faces(batch["image"]), "label": batch["label"].astype(np.int32)}
    if embeddings:
        out[aligned.HR_EMBEDDING] = np.stack(list(batch[aligned.HR_EMBEDDING])).astype(np.float32)
    return out


@dataclass
class DatasetInfo:
    uri: str
    shards: list[str]  # paths inside `filesystem` holding the train split (only it, in the per-split layout)
    filesystem: Any
    manifest_sha256: str
    n_train: int
    val_labels: np.ndarray  # [V] int64
    val_gallery: np.ndarray  # [V, 128, 128, 3] uint8: first image of each val identity
    val_probe: np.ndarray  # second image
    hr_embeddings_sha256: str | None = None  # identity net that made the dataset's hr_embedding column, if any
    mixed: bool = True  # False: an identity-sorted dataset from an older preprocess (few identities per batch)


def inspect_dataset(config: TrainConfig, storage: Storage) -> DatasetInfo:
    """Check the preprocess output and pick what the driver needs; every problem is one UserError line."""
    import pyarrow.compute as pc

    uri = normalize(config.data)
    manifest, parsed = aligned.read_manifest(uri, storage)
    files, embedded = parsed.get("files"), (parsed.get("hr_embeddings") or {}).get("identity_net_sha256")
    fs, _ = storage.resolve(uri)
    by_split = _shards_by_split(uri, files, storage)
    train, val = _open_shards(uri, fs, by_split, "train"), _open_shards(uri, fs, by_split, "val")
    # Only the split column is scanned to count; only val rows are materialised (no pixels) to pick pairs.
    n_train = train.count_rows(filter=pc.field("split") == "train")
    gallery, probe, pairs = _val_pairs(uri, val, config.val_identities)
    return DatasetInfo(
        uri=uri,
        shards=by_split.get("train", by_split.get(None, [])),
        filesystem=fs,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        n_train=n_train,
        val_labels=np.array([p[0] for p in pairs], dtype=np.int64),
        val_gallery=gallery,
        val_probe=probe,
        hr_embeddings_sha256=embedded if aligned.HR_EMBEDDING in train.schema.names else None,
        mixed=None not in by_split,
    )


def _shards_by_split(uri: str, files: list[dict] | None, storage: Storage) -> dict[str | None, list[str]]:
    """split → shard paths; key None for shards holding every split (older preprocess, or written by other means)."""
    out: dict[str | None, list[str]] = {}
    if files:  # the committed shards, as the preprocess job lists them
        for f in files:
            out.setdefault(f.get("split"), []).append(storage.resolve(join(uri, f["path"]))[1])
    else:  # a dataset written by other means: every Parquet file except rejects and hidden/temporary ones
        out[None] = [
            storage.resolve(info.path)[1]
            for info in storage.list(uri, recursive=True)
            if info.is_file
            and info.path.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in info.path[len(uri) :].split("/"))
            and Path(info.path).name != aligned.REJECTS
        ]
    if not any(out.values()):
        raise UserError(f"--data {uri}: no Parquet shards besides {aligned.REJECTS}")
    return {k: sorted(v) for k, v in out.items()}


def _open_shards(uri: str, fs: Any, by_split: dict[str | None, list[str]], split: str):
    """A pyarrow dataset over the shards that can hold ``split`` (filter rows by the split column still)."""
    import pyarrow.dataset as pads

    shards = by_split.get(split, []) + by_split.get(None, [])
    if not shards:
        if split == "val":
            return None  # answered below with what validation needs
        raise UserError(f"--data {uri}: the {split} split is empty")
    try:
        dataset = pads.dataset(shards, filesystem=fs, format="parquet")
    except (OSError, ValueError) as err:
        raise UserError(f"--data {uri}: unreadable shards ({first_line(err)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise UserError(f"--data {uri}: shards lack column(s) {', '.join(missing)}")
    return dataset


def _val_pairs(uri: str, val, limit: int) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Gallery and probe faces (uint8) of up to ``limit`` val identities with >= 2 faces, and the chosen
    (label, identity, gallery source, probe source) tuples; deterministic (sorted by label, then source)."""
    import pyarrow.compute as pc

    rows = (
        []
        if val is None
        else val.to_table(columns=["identity", "label", "source"], filter=pc.field("split") == "val").to_pylist()
    )
    by_identity: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        by_identity.setdefault(row["identity"], []).append((row["source"], int(row["label"])))
    faces = {name: sorted(r) for name, r in by_identity.items() if len(r) >= 2}  # (source, label), by source
    pairs = sorted((r[0][1], name, r[0][0], r[1][0]) for name, r in faces.items())[:limit]
    if len(pairs) < 2:
        raise UserError(
            f"--data {uri}: the val split has {len(pairs)} identities with >= 2 faces; validation (one gallery + one "
            "probe face per identity) needs at least 2 — preprocess with a larger val fraction"
        )
    # Only the few chosen faces' pixels are read (the val split is small; its own folder in the current layout).
    wanted = [p[2] for p in pairs] + [p[3] for p in pairs]
    chosen = pc.field("identity").isin([p[1] for p in pairs]) & pc.field("source").isin(wanted)
    table = val.to_table(columns=["source", "image"], filter=chosen)
    blob = dict(zip(table.column("source").to_pylist(), table.column("image").to_pylist()))
    try:
        return decode_faces([blob[p[2]] for p in pairs]), decode_faces([blob[p[3]] for p in pairs]), pairs
    except (OSError, ValueError) as err:
        raise UserError(f"--data {uri}: unreadable val face ({err})") from None


def hr_embeddings_use(config: TrainConfig, data: DatasetInfo, identity_sha256: str) -> tuple[bool, str]:
    """Whether the step takes the HR embeddings from the dataset (skipping FaceNet's HR forward) and why."""
    if config.embedding_loss == "none":
        return False, "not used (--embedding-loss none)"
    if data.hr_embeddings_sha256 is None:
        return False, "computed each step (the dataset has none: `ipsr preprocess --hr-embeddings WEIGHTS`)"
    if data.hr_embeddings_sha256 != identity_sha256:
        return False, "computed each step (the dataset's were made with other FaceNet weights)"
    if config.identity_jitter:
        return False, "computed each step (--identity-jitter > 0 embeds a new random view of every HR face)"
    return True, "precomputed (the dataset's hr_embedding column, same FaceNet weights)"


CACHE_MAX_FACES = 10_000  # a train split this small is decoded once: ≤ ~0.5 GB in the object store


def train_dataset(data: DatasetInfo, embeddings: bool = False, cache: bool = False):
    """The ``train`` split as a Ray Dataset of decoded faces (column ``hr``: uint8 128×128×3, ``label``: int32;
    with ``embeddings`` also ``hr_embedding``: float32 [512]).

    With ``cache`` the faces are decoded once, here, and every epoch re-splits the decoded blocks in a new random
    order: an epoch of a small split otherwise pays a fresh Parquet read and decode pass, whose start-up dominates
    (measured on ORL, 2 cores, whole `ipsr train` runs of 85 steps in 6 epochs: 117 and 157 s cached, 187 s
    streamed)."""
    import ray.data
    from ray.data.expressions import col

    ds = ray.data.read_parquet(data.shards, filesystem=data.filesystem, shuffle="files")
    columns = ["image", "label", "split"] + [aligned.HR_EMBEDDING] * embeddings
    ds = ds.select_columns(columns).filter(expr=col("split") == "train")
    # Decoding is CPU work in Ray Data tasks, beside the training workers, never in their step.
    ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=128, fn_kwargs={"embeddings": embeddings})
    return ds.materialize().randomize_block_order() if cache else ds
