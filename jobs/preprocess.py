"""``ipsr preprocess``: identity folders → MTCNN-aligned 128×128 faces, on Ray Data.

Pipeline (one streaming Ray Data job, nothing materialised in the driver except small per-image summaries):

    list (driver, one listing per identity folder, in parallel)  or  --manifest
      → read bytes           a few long-lived actors (no CPU slot); a thread pool per block hides S3 latency
      → decode + align       actor pool, one MTCNN per actor: safe decode, letterbox to detect_size² so that
                             real batches form, batched detect, boxes mapped back, square crop from the original
      → write shard          as many long-lived actors; aligned faces → Parquet under DST/_temporary/<run>/<split>/
      → commit (driver)      shards renamed into DST/data/<split>/, rejects.parquet, manifest.json, _SUCCESS last

Inputs enter the pipeline in a pseudo-random order (a hash of the source path), not identity by identity: every
shard of the train split then mixes identities, so training batches do too (VGGFace2 has ~360 images per
identity; identity-sorted shards left each batch a few people, whatever the file shuffle and the local buffer).
The order is reproducible, and costs nothing: no global shuffle of the pixels ever happens.

Every listed input ends up either aligned or in rejects.parquet with one of ``REASONS``:

- ``io_error``: the bytes could not be read (missing object, permission, storage still failing after retries).
- ``too_large``: the file is larger than ``max_bytes`` or the image declares more than ``max_pixels`` pixels;
  decided from the listing size / image header, before anything is decoded (decompression bombs land here).
- ``unsupported_format``: the content does not start with a JPEG/PNG/PGM/PPM/WebP/BMP/GIF/TIFF signature — another
  image format (ICO, PDF, …) or no image at all (a text file). Decided from the bytes, never from the file name.
- ``corrupt``: an empty file, or a supported signature whose data does not decode (truncated, damaged).
- ``no_face``: decoded fine, but MTCNN found no face.

Output (committed when ``_SUCCESS`` exists; readers must ignore a prefix without it):

    DST/data/<split>/part-NNNNN.parquet   image (PNG bytes, 128×128 RGB), identity, label, split, source, det_prob,
                                  box [x1, y1, x2, y2], landmarks [x, y] × 5 — coordinates in original pixels;
                                  one folder per split (train/, val/, test/), rows in hash order
    DST/rejects.parquet           source, identity, reason, detail
    DST/manifest.json             counts (seen = aligned + rejected), shard list, labels, config, versions, timings
    DST/_SUCCESS                  not written when no face at all was aligned: the job then exits non-zero

Face choice: the largest detection (what the paper's MTCNN setup keeps by default), cropped as a square around
its box with ``margin`` output pixels of context. Labels are dense over the *listed* identities in sorted order
(``manifest.json["labels"][label]`` is the name), so an identity whose images were all rejected keeps its
number; the split is a hash of the identity name, so it never changes between runs or machines.

Faces are stored as PNG: the dataset is the high-resolution *target* of super-resolution training, and JPEG's
8×8 block artefacts would be learned as "detail" (and would survive the bicubic degradation differently from
real detail). PNG at compression level 1 costs ~0.6 ms per face and ~16 KB (JPEG q95: ~6 KB); training decodes
either in well under a millisecond.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ipsr_model.errors import UserError
from ipsr_platform import cluster, console
from ipsr_platform.aligned import DATA, ENTRIES, FACE_COLUMNS, HR_EMBEDDING, MANIFEST, REJECTS, SUCCESS, TEMPORARY
from ipsr_platform.commands import job_command, run_main
from ipsr_platform.config import SPLITS, PreprocessConfig
from ipsr_platform.faces import FACE_SIZE, FaceAligner, Rejected, encode_png, identity_files
from ipsr_platform.storage import Storage, StorageError, join, normalize

REASONS = ("no_face", "corrupt", "too_large", "unsupported_format", "io_error")
MAX_BLOCK_ROWS = 1024  # rows per input block: the unit of work of a read task and of an actor call


INPUT_SCHEMA = pa.schema([("source", pa.string()), ("identity", pa.string()), ("size", pa.int64())])
EMBEDDING_DIM = 512  # ipsr_model.identity.EMBEDDING_DIM (not imported: this module loads without torch)
ALIGNED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("identity", pa.string()),
        ("label", pa.int32()),
        ("split", pa.string()),
        ("image", pa.binary()),  # PNG, 128×128 RGB
        ("det_prob", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in original-image pixels
        ("landmarks", pa.list_(pa.float32(), 10)),  # eyes, nose, mouth corners: x, y pairs, original pixels
        ("reason", pa.string()),  # null when aligned
        ("detail", pa.string()),
        ("done_at", pa.float64()),  # wall clock when its batch finished: throughput without start-up (not stored)
        # FaceNet embedding of the aligned face (``--hr-embeddings``): the HR half of the identity loss, precomputed
        (HR_EMBEDDING, pa.list_(pa.float32(), EMBEDDING_DIM)),
    ]
)
REJECT_COLUMNS = ["source", "identity", "reason", "detail"]


# --- listing ----------------------------------------------------------------------------------------------------


def _unit(identity: str) -> float:
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") / 2**64


def split_of(identity: str, fractions: dict[str, float]) -> str:
    """Deterministic split by identity: the same name lands in the same split on every run and machine."""
    u = _unit(identity)
    val, test = fractions.get("val", 0.0), fractions.get("test", 0.0)
    return "val" if u < val else "test" if u < val + test else "train"


MIN_SPLIT_IDENTITIES = 2  # per non-zero val/test fraction, once a dataset has MIN_SPLIT_FROM identities
MIN_SPLIT_FROM = 10


def assign_splits(names: list[str], fractions: dict[str, float]) -> dict[str, str]:
    """identity → split by ``split_of``, except that from 10 identities on, a non-zero val or test fraction gets at
    least 2 identities (the next ones in hash order): validation needs 2, and 2 % of 40 identities is none.

    On large sets (VGGFace2) the minimum never binds and this is exactly ``split_of``."""
    split = {n: split_of(n, fractions) for n in names}
    if len(names) < MIN_SPLIT_FROM:
        return split
    wanted = {
        s: max(sum(v == s for v in split.values()), MIN_SPLIT_IDENTITIES if fractions.get(s, 0) > 0 else 0)
        for s in ("val", "test")
    }
    ordered = sorted(names, key=_unit)  # split_of's val are the first in this order, its test the next ones
    return {
        n: "val" if i < wanted["val"] else "test" if i < wanted["val"] + wanted["test"] else "train"
        for i, n in enumerate(ordered)
    }


def mixed_order(table: pa.Table) -> pa.Table:
    """The rows in the order of a hash of their source: reproducible, and every run of consecutive rows (a block,
    a shard) mixes identities and splits."""
    keys = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")
            for s in table.column("source").to_pylist()
        ),
        dtype=np.uint64,
        count=table.num_rows,
    )
    return table.take(pa.array(np.argsort(keys, kind="stable")))


def list_inputs(cfg: PreprocessConfig, storage: Storage) -> tuple[pa.Table, int]:
    """(source, identity, size) sorted by identity then source, and the number of ignored top-level files."""
    src = normalize(cfg.input)
    if cfg.manifest:
        table, ignored = _read_input_list(cfg.manifest, src, storage), 0
    else:
        if not storage.is_dir(src):
            raise UserError(f"input folder not found: {src}")
        folders, ignored = identity_files(src, storage, recursive=True)
        files = [(e, name) for name, entries in folders.items() for e in entries]
        table = pa.table(
            {
                "source": [e.path for e, _ in files],
                "identity": [name for _, name in files],
                "size": [-1 if e.size is None else e.size for e, _ in files],
            },
            schema=INPUT_SCHEMA,
        )
    if table.num_rows == 0:
        raise UserError(f"no input files found under {src} (expected SRC/<identity>/<image>)")
    # slice(0, None) keeps every row: no --limit
    return table.sort_by([("identity", "ascending"), ("source", "ascending")]).slice(0, cfg.limit), ignored


def _read_input_list(manifest: str, src: str, storage: Storage) -> pa.Table:
    uri = manifest if manifest.startswith("s3://") else normalize(manifest)
    data = storage.read_bytes(uri)
    if manifest.endswith(".parquet"):
        t = pq.read_table(io.BytesIO(data))
        if "path" not in t.column_names:
            raise UserError(f"manifest {manifest} needs a 'path' column (optional: 'identity')")
        paths = [str(p) for p in t.column("path").to_pylist()]
        names = t.column("identity").to_pylist() if "identity" in t.column_names else [None] * len(paths)
    else:
        lines = [ln.strip() for ln in data.decode("utf-8", errors="replace").splitlines()]
        paths = [ln for ln in lines if ln and not ln.startswith("#")]
        names = [None] * len(paths)
    sources = [p if p.startswith(("s3://", "/")) else join(src, p) for p in paths]
    # Without an identity column the identity is the parent folder's name, as in the folder layout.
    identities = [n or s.rsplit("/", 2)[-2] for n, s in zip(names, sources)]
    return pa.table({"source": sources, "identity": identities, "size": [-1] * len(sources)}, schema=INPUT_SCHEMA)


# --- Ray stages -------------------------------------------------------------------------------------------------


def read_stage(batch: pa.Table, storage: Storage, max_bytes: int, io_threads: int) -> pa.Table:
    """Adds ``data`` (bytes) and, for inputs that can't be read, ``reason``/``detail``."""

    def one(source: str, size: int) -> tuple[bytes | None, str | None, str | None]:
        if size > max_bytes:
            return None, "too_large", f"file is {size} bytes > max_bytes {max_bytes}"
        try:
            data = storage.read_bytes(source)
        except StorageError as err:
            return None, "io_error", str(err)
        if len(data) > max_bytes:
            return None, "too_large", f"file is {len(data)} bytes > max_bytes {max_bytes}"
        return data, None, None

    with ThreadPoolExecutor(max_workers=min(io_threads, max(1, batch.num_rows))) as pool:
        results = list(pool.map(one, batch.column("source").to_pylist(), batch.column("size").to_pylist()))
    data, reasons, details = zip(*results) if results else ((), (), ())
    return (
        batch.append_column("data", pa.array(data, pa.binary()))
        .append_column("reason", pa.array(reasons, pa.string()))
        .append_column("detail", pa.array(details, pa.string()))
    )


class Aligner:
    """The Ray actor around ``faces.FaceAligner``: MTCNN's three nets load once per process, not once per batch."""

    def __init__(self, cfg: PreprocessConfig, identity_net_sha256: str | None):
        import torch

        torch.set_num_threads(1)  # see _process: one torch thread per actor
        self.aligner = FaceAligner(cfg.device, cfg.detect_size, cfg.min_face_size, cfg.margin, cfg.max_pixels)
        self.identity_net = None
        if cfg.hr_embeddings:
            from ipsr_model.identity import IdentityNet

            self.identity_net = IdentityNet(cfg.hr_embeddings).to(cfg.device, memory_format=torch.channels_last)
            if self.identity_net.weights_sha256 != identity_net_sha256:
                raise RuntimeError(
                    f"actor loaded identity weights {self.identity_net.weights_sha256[:12]}…, the "
                    f"driver {identity_net_sha256[:12]}…: the '{cfg.hr_embeddings}' cache differs"
                )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["source", "identity", "label", "split", "reason", "detail"]).to_pylist()
        out = [dict(r, image=None, det_prob=None, box=None, landmarks=None) for r in rows]
        todo = [i for i, row in enumerate(rows) if not row["reason"]]  # the others were rejected while reading
        blobs = batch.column("data").to_pylist()
        for i, result in zip(todo, self.aligner.align([blobs[i] for i in todo])):
            if isinstance(result, Rejected):
                out[i].update(reason=result.reason, detail=result.detail)
            else:
                out[i].update(
                    image=encode_png(result.face),
                    det_prob=result.det_prob,
                    box=result.box.astype(np.float32).tolist(),
                    landmarks=result.landmarks.astype(np.float32).reshape(-1).tolist(),
                )
        if self.identity_net is not None:
            self._embed(out)
        done_at = time.time()
        return pa.Table.from_pylist([dict(row, done_at=done_at) for row in out], schema=ALIGNED_SCHEMA)

    def _embed(self, rows: list[dict]) -> None:
        """The embedding of the stored face itself (its PNG decoded), so training's HR input is bit-identical."""
        import torch

        from ipsr_model.identify import embed
        from ipsr_model.images import to_tensor
        from ipsr_platform.faces import decode_face

        done = [r for r in rows if r["image"] is not None]
        if not done:
            return
        faces = to_tensor([decode_face(r["image"]) for r in done])
        device = next(self.identity_net.parameters()).device
        with torch.inference_mode():
            vectors = embed(self.identity_net, faces.to(device, memory_format=torch.channels_last)).cpu().numpy()
        for r, v in zip(done, vectors):
            r[HR_EMBEDDING] = v.tolist()


def write_stage(batch: pa.Table, storage: Storage, tmp: str, columns: list[str]) -> pa.Table:
    """Aligned faces → one Parquet shard per split under ``tmp/<split>/``; returns one small summary row per input
    (no pixels), naming the shard its face went to.

    A retried task writes a second file under a fresh name; only shards named in the returned summaries are
    committed, so an orphan from a failed attempt is never part of the dataset. A write that still fails after
    the storage retries comes back as ``fatal`` (Ray would wrap a raised error into a multi-line remote
    traceback; the driver raises it as one clear StorageError naming the object).
    """
    ok = pc.is_null(batch.column("reason"))
    faces = batch.filter(ok)
    names: dict[str, str] = {}
    fatal = None
    for split in pc.unique(faces.column("split")).to_pylist():
        name = f"{split}/part-{uuid.uuid4().hex}.parquet"
        part = faces.filter(pc.field("split") == split).select(columns)
        try:
            storage.call("write", join(tmp, name), lambda fs, path, part=part: _write_shard(fs, path, part))
        except StorageError as err:
            fatal = str(err)
            break
        names[split] = name
    summary = batch.select(["source", "identity", "split", "reason", "detail", "done_at"])
    shard = [names.get(s) if good else None for s, good in zip(batch.column("split").to_pylist(), ok.to_pylist())]
    fatal_col = pa.nulls(batch.num_rows, pa.string()) if fatal is None else pa.repeat(fatal, batch.num_rows)
    return summary.append_column("shard", pa.array(shard, pa.string())).append_column("fatal", fatal_col)


class Stage:
    """A stage function in a long-lived actor (Ray Data runs only callable classes in actors). As plain tasks, reads
    and writes paid a new Python process (~1.5 s of CPU) almost every time: the MTCNN actors hold every CPU, so Ray
    kills any other idle worker after 1 s (its soft limit is one worker per CPU), and the next task starts a fresh
    one (measured: ~10 per 20k images)."""

    def __init__(self, fn, kwargs: dict[str, Any]):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(batch, **self.kwargs)


class Reader(Stage):
    """``read_stage`` in an actor: its own name in Ray's progress, dashboard and process titles."""


class Writer(Stage):
    """``write_stage`` in an actor."""


def read_by_stage_actors(ds, storage: Storage, max_bytes: int, io_threads: int, actors: int):
    """``ds`` (``source``, ``size``) with ``data`` read (``read_stage``) in a small fixed pool of ``Reader`` actors.
    Reads wait on storage, not on the CPU: they take no CPU slot, so they run beside the model actors that hold
    every core (with a CPU request they would wait for a free core that never comes)."""
    import ray.data

    return ds.map_batches(
        Reader,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(
            fn=read_stage, kwargs=dict(storage=storage, max_bytes=max_bytes, io_threads=io_threads)
        ),
    )


def input_dataset(table: pa.Table, batch_size: int, model_actors: int):
    """``table`` as a Ray Dataset of blocks of at least one batch, about four per model actor (≤ 1,024 rows), so
    that the actors stay busy while a read waits on storage."""
    import ray.data

    block = max(batch_size, min(1024, -(-table.num_rows // (4 * model_actors))))
    return ray.data.from_arrow([table.slice(i, block) for i in range(0, table.num_rows, block)])


def _write_shard(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    if isinstance(fs, pafs.LocalFileSystem):  # S3 has no folders to make
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=1024, use_dictionary=["identity", "split"])


# --- driver -----------------------------------------------------------------------------------------------------


class Tally:
    """What the driver keeps of the stream: counters, shard sizes and the reject rows — never one row per face,
    so its memory stays small at millions of images."""

    def __init__(self) -> None:
        self.seen = 0
        self.reasons: Counter = Counter()
        self.splits: Counter = Counter()
        self.identities: set[str] = set()
        self.shards: Counter = Counter()  # scratch shard name → rows
        self.rejects: list[pa.Table] = []
        self.done_at: list[np.ndarray] = []

    def add(self, part: pa.Table) -> None:
        ok = pc.is_null(part.column("reason"))
        aligned, rejected = part.filter(ok), part.filter(pc.invert(ok))
        self.seen += part.num_rows
        self.reasons.update(rejected.column("reason").to_pylist())
        self.splits.update(aligned.column("split").to_pylist())
        self.identities.update(pc.unique(aligned.column("identity")).to_pylist())
        self.shards.update(aligned.column("shard").to_pylist())
        if rejected.num_rows:
            self.rejects.append(rejected.select(REJECT_COLUMNS))
        self.done_at.append(part.column("done_at").to_numpy())

    def steady_rate(self) -> float | None:
        """Images/s between the 10th and 90th percentile of completion times: the rate once the actors are up
        (start-up and the last stragglers excluded), i.e. what a run of millions of images sees."""
        t = np.sort(np.concatenate(self.done_at)) if self.done_at else np.empty(0)
        if len(t) < 10:
            return None
        lo, hi = int(0.1 * len(t)), int(0.9 * len(t))
        return (hi - lo) / (t[hi] - t[lo]) if t[hi] > t[lo] else None


def _prepare_output(storage: Storage, out: str) -> None:
    """Refuse to touch foreign files; clear what an earlier (interrupted or overwritten) run left."""
    if not storage.exists(out):
        return
    if not storage.is_dir(out):
        raise UserError(f"output {out} exists and is a file")
    entries = {i.base_name for i in storage.list(out)}
    foreign = sorted(entries - ENTRIES)
    if foreign:
        raise UserError(
            f"output {out} holds files that are not an ipsr dataset ({', '.join(foreign[:3])}); "
            "choose an empty or new path"
        )
    # data/ alone may be someone's own folder; with rejects.parquet beside it, it is ours (a crash mid-commit).
    if entries and not entries & {SUCCESS, TEMPORARY, MANIFEST, REJECTS}:
        raise UserError(f"output {out} is not empty and holds no ipsr dataset; choose an empty or new path")
    # _SUCCESS goes first: from this moment the old dataset is visibly not committed.
    for name in (SUCCESS, MANIFEST, REJECTS, DATA, TEMPORARY):
        storage.delete(join(out, name))


def run(cfg: PreprocessConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Run the job; returns the manifest. A committed output is left alone unless ``cfg.overwrite``."""
    storage = storage or Storage.from_env()
    out = normalize(cfg.output)
    t_start = time.perf_counter()
    if storage.exists(join(out, SUCCESS)) and not cfg.overwrite:
        console.say(f"{out} is already committed (_SUCCESS present); nothing to do. Use --overwrite to rebuild it.")
        return json.loads(storage.read_bytes(join(out, MANIFEST)))
    identity_net_sha256 = _hr_embeddings_sha256(cfg)  # resolved once here: a bad source fails before any actor
    _prepare_output(storage, out)

    inputs, ignored = list_inputs(cfg, storage)
    if ignored:
        console.say(
            f"warning: ignored {ignored} file(s) directly under {normalize(cfg.input)} (not in an identity folder)"
        )
    inputs, names = _label_and_split(inputs, cfg.split)
    t_listed = time.perf_counter()

    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    tmp = join(out, TEMPORARY, run_id)
    storage.write_bytes(join(tmp, "_started"), b"")  # fails fast, naming the object, if DST is not writable

    cluster.connect()
    tally = _process(cfg, storage, inputs, tmp, identity_net_sha256)
    t_processed = time.perf_counter()

    manifest = _commit(cfg, storage, out, tmp, inputs, names, tally, ignored)
    manifest["hr_embeddings"] = cfg.hr_embeddings and {
        "identity_weights": cfg.hr_embeddings,
        "identity_net_sha256": identity_net_sha256,
    }
    t_end = time.perf_counter()
    manifest["timings_s"] = {
        "list": round(t_listed - t_start, 3),
        "process": round(t_processed - t_listed, 3),
        "commit": round(t_end - t_processed, 3),
        "total": round(t_end - t_start, 3),
    }
    steady = tally.steady_rate()
    manifest["images_per_s"] = {
        "end_to_end": round(manifest["counts"]["seen"] / max(t_end - t_start, 1e-9), 2),
        "steady": round(steady, 2) if steady else None,
    }
    # The manifest (with its timings) goes before _SUCCESS: whoever sees the marker sees the whole manifest. The
    # scratch (orphans of retried tasks) goes after the manifest, so a crash at any point leaves _temporary or
    # manifest.json behind: a rerun recognises the output as its own and rebuilds it.
    storage.write_bytes(join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    storage.delete(join(out, TEMPORARY))
    _print_summary(manifest, out)
    if not manifest["counts"]["aligned"]:  # left uncommitted, for inspection: a rerun rebuilds it
        top = tally.reasons.most_common(3)
        raise UserError(
            f"no face aligned from {manifest['counts']['seen']} input(s) ("
            + ", ".join(f"{reason} {n}" for reason, n in top)
            + f"); see {join(out, REJECTS)}"
        )
    storage.write_bytes(join(out, SUCCESS), b"")
    return manifest


def _hr_embeddings_sha256(cfg: PreprocessConfig) -> str | None:
    """The sha256 of the FaceNet behind ``--hr-embeddings`` (None without it); a net the column cannot hold is
    refused."""
    if not cfg.hr_embeddings:
        return None
    from ipsr_model.weights import load_identity_weights

    state, sha256 = load_identity_weights(cfg.hr_embeddings)
    if state["last_linear.weight"].shape[0] != EMBEDDING_DIM:  # the column's fixed width, what training reads
        raise UserError(
            f"--hr-embeddings {cfg.hr_embeddings}: a {state['last_linear.weight'].shape[0]}-D FaceNet; "
            f"the dataset's hr_embedding column holds {EMBEDDING_DIM}-D ones (use a 512-D source)"
        )
    return sha256


def _label_and_split(inputs: pa.Table, split: dict[str, float]) -> tuple[pa.Table, list[str]]:
    """The listing with each input's label (its identity's index in name order) and split (by identity), in
    hash order; and the identity names."""
    idents = inputs.column("identity").to_pylist()
    names = sorted(set(idents))
    label_of = {n: i for i, n in enumerate(names)}
    inputs = inputs.append_column("label", pa.array([label_of[n] for n in idents], pa.int32()))
    split_by_name = assign_splits(names, split)
    return mixed_order(inputs.append_column("split", pa.array([split_by_name[n] for n in idents], pa.string()))), names


def _process(
    cfg: PreprocessConfig, storage: Storage, inputs: pa.Table, tmp: str, identity_net_sha256: str | None
) -> Tally:
    import ray.data  # binds ray too

    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1))
    if cfg.device == "cuda":
        gpus = float(resources.get("GPU", 0))
        if gpus < 1:
            raise UserError("--device cuda, but the Ray cluster has no GPU")
        # MTCNN's nets are small; the per-box Python loops between them are host-bound. Several actors per GPU
        # keep it busy (the GPU is shared fractionally).
        n = cfg.num_actors or int(gpus) * 4
        actor_args = dict(num_gpus=gpus / n if n > gpus else 1, num_cpus=1)
    else:
        n = cfg.num_actors or max(1, int(cpus))
        # One torch thread per actor: on small images, processes scale better than intra-op threads.
        actor_args = dict(num_cpus=min(1.0, cpus / n))

    # An actor works on one block at a time, so small inputs need small blocks to keep every actor busy; large
    # inputs get up to MAX_BLOCK_ROWS per block to keep the number of tasks (and the scheduling cost) low.
    rows = min(MAX_BLOCK_ROWS, max(cfg.batch_size, -(-inputs.num_rows // (4 * n))))
    blocks = [inputs.slice(i, rows) for i in range(0, inputs.num_rows, rows)]
    io_actors = max(1, -(-n // 4))  # readers, and as many writers
    # Local reads are ~10x faster than alignment: without a budget the read outputs queue up in the object store
    # (measured: 0.25 / 0.65 / 1.1 GB peak at 20k / 50k / 100k images). The dataset keeps a copy of the context
    # it is built with, so the budget is this job's and the process's own context is restored.
    context = ray.data.DataContext.get_current()
    unbounded = context.execution_options.resource_limits
    budget = (cfg.object_store_mb or max(512, 256 * n)) * 2**20
    context.execution_options.resource_limits = unbounded.copy(object_store_memory=budget)
    try:
        ds = _pipeline(cfg, storage, blocks, tmp, n, io_actors, actor_args, identity_net_sha256)
    finally:
        context.execution_options.resource_limits = unbounded
    tally = Tally()
    with console.progress("preprocess", inputs.num_rows, "img") as advance:
        for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            fatal = part.column("fatal").drop_null()
            if len(fatal):
                raise StorageError(fatal[0].as_py())  # leaving the loop stops the pipeline; nothing is committed
            tally.add(part)
            advance(part.num_rows)
    return tally


def _pipeline(
    cfg: PreprocessConfig,
    storage: Storage,
    blocks: list[pa.Table],
    tmp: str,
    n: int,
    io_actors: int,
    actor_args: dict[str, Any],
    identity_net_sha256: str | None,
):
    """read → align (n actors) → write, as one streaming Ray Dataset (not started yet)."""
    import ray.data

    # Reads and writes take no CPU slot (``read_by_stage_actors``): one reader's thread pool keeps several aligners fed.
    return (
        read_by_stage_actors(ray.data.from_arrow(blocks), storage, cfg.max_bytes, cfg.io_threads, io_actors)
        .map_batches(
            Aligner,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=n),
            **actor_args,
            fn_constructor_kwargs=dict(cfg=cfg, identity_net_sha256=identity_net_sha256),
        )
        .map_batches(
            Writer,
            batch_size=cfg.rows_per_shard,
            batch_format="pyarrow",
            num_cpus=0,
            compute=ray.data.ActorPoolStrategy(size=io_actors),
            fn_constructor_kwargs=dict(
                fn=write_stage,
                kwargs=dict(storage=storage, tmp=tmp, columns=FACE_COLUMNS + [HR_EMBEDDING] * bool(cfg.hr_embeddings)),
            ),
        )
    )


def _commit(
    cfg: PreprocessConfig,
    storage: Storage,
    out: str,
    tmp: str,
    inputs: pa.Table,
    names: list[str],
    tally: Tally,
    ignored: int,
) -> dict[str, Any]:
    if tally.seen != inputs.num_rows:  # the pipeline must neither lose nor duplicate an input
        raise RuntimeError(f"internal: {inputs.num_rows} inputs listed but {tally.seen} came out of the pipeline")
    if set(tally.reasons) - set(REASONS):
        raise RuntimeError(f"internal: unknown reject reason in {dict(tally.reasons)}")
    counts = {
        "seen": tally.seen,
        "aligned": sum(tally.shards.values()),
        "rejected": {r: tally.reasons.get(r, 0) for r in REASONS},
        "splits": {s: tally.splits.get(s, 0) for s in SPLITS},
        "identities": {"listed": len(names), "aligned": len(tally.identities)},
        "ignored_top_level_files": ignored,
    }
    rejects = (
        pa.concat_tables(tally.rejects)
        if tally.rejects
        else pa.table({c: pa.array([], pa.string()) for c in REJECT_COLUMNS})
    ).sort_by("source")

    # Stable names in a stable order, numbered within each split; moves run in parallel (one copy each on S3).
    moves, files = [], []  # (scratch name, committed path), and the manifest's shard list
    for split in SPLITS:
        for i, shard in enumerate(s for s in sorted(tally.shards) if s.startswith(f"{split}/")):
            moves.append((shard, f"{DATA}/{split}/part-{i:05d}.parquet"))
            files.append({"path": moves[-1][1], "split": split, "rows": tally.shards[shard]})
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda m: storage.move(join(tmp, m[0]), join(out, m[1])), moves))
    storage.call("write", join(out, REJECTS), lambda fs, path: pq.write_table(rejects, path, filesystem=fs))

    return {
        "format": "ipsr-aligned-faces/1",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": {"size_hw": [FACE_SIZE, FACE_SIZE], "mode": "RGB", "encoding": "png"},
        "counts": counts,
        "files": files,
        "rejects": REJECTS,
        "labels": names,  # label i is names[i]; dense over the listed identities, sorted
        "config": cfg.model_dump(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    """What made the dataset: the versions that decide its pixels (MTCNN, resampling, PNG) and its layout."""
    from importlib.metadata import version

    import PIL
    import ray
    import torch

    return {
        "ipsr": version("ipsr"),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "facenet-pytorch": version("facenet-pytorch"),
        "pillow": PIL.__version__,
        "pyarrow": pa.__version__,
    }


def _print_summary(manifest: dict[str, Any], out: str) -> None:
    c, t, rate = manifest["counts"], manifest["timings_s"], manifest["images_per_s"]
    console.summary(f"ipsr preprocess → {out}", [
        ("seen", c["seen"]), ("aligned", c["aligned"]),
        *((f"rejected: {reason}", n) for reason, n in c["rejected"].items()),
        ("splits", ", ".join(f"{k} {v}" for k, v in c["splits"].items())),
        ("identities", f"{c['identities']['aligned']} with faces / {c['identities']['listed']} listed"),
        ("shards", len(manifest["files"])),
        ("time", f"list {t['list']} s, process {t['process']} s, total {t['total']} s"),
        ("images/s", f"{rate['end_to_end']} end to end, {rate['steady']} once the actors are up"),
    ], error=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.preprocess [flags]``: the same command as ``ipsr preprocess`` (generated from its config)."""
    run_main(job_command("preprocess", run), argv)


if __name__ == "__main__":
    main()
