"""`ipsr enrol`: bulk enrolment of a gallery as a Ray Data job.

    list (driver)            SRC/<identity>/<image> (local or s3://), or an `ipsr preprocess` output's faces; an
                             input whose image_id the gallery already holds is skipped (a rerun adds nothing twice)
    → read (Reader actors)   bytes; too_large / io_error rejects
    → embed (n actors)       MTCNN alignment unless --aligned (then the centre square, as `ipsr serve`'s
                             aligned=true), FaceNet on the 128×128 face: HR gallery faces are not super-resolved
    → append (driver)        one immutable gallery segment per ``rows_per_segment`` faces (ipsr_platform/gallery.py):
                             a crash leaves only whole segments, and a running `ipsr serve` picks them up in its
                             background refresh, without a restart

An input's ``image_id`` is its path under the input (``identity/file``; a preprocess output's faces: ``source``), so
a rerun of the same tree, or of a run that died half-way, enrols only what is missing. The face → embedding path is
the service's (``faces.enrolment_faces``, ``identify.embed``): the same photo gives the same
gallery row either way.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipsr_model.errors import UserError
from ipsr_platform import aligned, cluster, console
from ipsr_platform.commands import job_command, run_main
from ipsr_platform.config import EnrolConfig
from ipsr_platform.faces import Rejected, enrolment_faces
from ipsr_platform.gallery import GalleryStore, WeightsMismatch, check_name
from ipsr_platform.storage import Storage, join, normalize
from jobs.preprocess import input_dataset, list_inputs, read_by_stage_actors

OUT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("identity", pa.string()),
        ("image_id", pa.string()),
        ("reason", pa.string()),  # null when enrolled
        ("detail", pa.string()),
        ("embedding", pa.list_(pa.float32())),  # null when rejected
    ]
)


@dataclass(frozen=True)
class EnrolResult:
    gallery: str
    store: str  # the gallery store's root
    seen: int  # inputs listed
    already_enrolled: int  # skipped: their image_id was in the gallery
    enrolled: int
    rejected: dict[str, int]  # reason → inputs, most common first
    segments_written: int
    gallery_faces: int  # afterwards
    gallery_identities: int
    seconds: float
    faces_per_s: float
    rejects_file: str | None  # None when nothing was rejected


class Embedder:
    """The Ray actor: MTCNN (unless ``aligned``) and FaceNet load once per process, not once per batch."""

    def __init__(self, cfg: EnrolConfig, identity_net_sha256: str, aligned_input: bool):
        import torch

        from ipsr_model.identity import IdentityNet
        from ipsr_platform.faces import FaceAligner

        torch.set_num_threads(1)  # one torch thread per actor: processes scale better than intra-op threads
        self.device, self.max_pixels = torch.device(cfg.device), cfg.max_pixels
        self.aligner = None if aligned_input else FaceAligner(cfg.device, max_pixels=cfg.max_pixels)
        self.net = IdentityNet(cfg.identity_weights).to(self.device, memory_format=torch.channels_last).eval()
        if self.net.weights_sha256 != identity_net_sha256:
            raise RuntimeError(f"actor loaded identity weights {self.net.weights_sha256[:12]}…, the driver "
                               f"{identity_net_sha256[:12]}…: the '{cfg.identity_weights}' cache differs")  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from ipsr_model.identify import embed
        from ipsr_model.images import to_tensor

        rows = batch.select(["source", "identity", "image_id", "reason", "detail"]).to_pylist()
        todo = [i for i, row in enumerate(rows) if not row["reason"]]  # the others were rejected while reading
        blobs = batch.column("data").to_pylist()
        good, faces = [], []
        for i, face in zip(todo, enrolment_faces([blobs[i] for i in todo], self.aligner, self.max_pixels)):
            if isinstance(face, Rejected):
                rows[i].update(reason=face.reason, detail=face.detail)
            else:
                good.append(i), faces.append(face)
        for row in rows:
            row["embedding"] = None
        if faces:
            with torch.inference_mode():
                batch = to_tensor(faces).to(self.device, memory_format=torch.channels_last)  # as the service's
                vectors = embed(self.net, batch).cpu().numpy()
            for i, vector in zip(good, vectors):
                rows[i]["embedding"] = vector.tolist()
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


def face_stage(batch: pa.Table) -> pa.Table:
    """A preprocess output's rows (``image`` PNG) as read rows: ``data`` is the face itself."""
    return pa.table(
        {
            "source": batch.column("source"),
            "identity": batch.column("identity"),
            "image_id": batch.column("image_id"),
            "data": batch.column("image"),
            "reason": pa.nulls(batch.num_rows, pa.string()),
            "detail": pa.nulls(batch.num_rows, pa.string()),
        }
    )


# --- driver -----------------------------------------------------------------------------------------------------


def run(cfg: EnrolConfig, storage: Storage | None = None) -> EnrolResult:
    """Enrol what the gallery does not hold yet; returns the summary. When no input at all is in the gallery
    afterwards (every one rejected): a UserError with the top reasons."""
    from ipsr_model.paths import galleries_dir
    from ipsr_model.weights import load_identity_weights

    storage = storage or Storage.from_env()
    t_start = time.perf_counter()
    check_name(cfg.gallery)
    store = GalleryStore(normalize(cfg.galleries or str(galleries_dir())), storage)
    _, sha256 = load_identity_weights(cfg.identity_weights)  # fails here, not in every actor
    existing = store.load(cfg.gallery, with_embeddings=False)  # at a million faces, 2 GB the driver never uses
    if existing is not None and existing.identity_net_sha256 != sha256:
        raise WeightsMismatch(
            f"gallery {cfg.gallery!r} holds embeddings of identity net {existing.identity_net_sha256[:12]}…, not "
            f"{sha256[:12]}… ({cfg.identity_weights}): enrol into a new gallery, or pass the gallery's weights"
        )
    inputs, faces_input = _inputs(cfg, storage)
    known = existing.image_id_set if existing is not None else frozenset()
    todo = inputs.filter(pc.invert(pc.is_in(inputs.column("image_id"), pa.array(list(known), pa.string()))))
    skipped = inputs.num_rows - todo.num_rows
    console.say(f"enrol {todo.num_rows} of {inputs.num_rows} input(s) into gallery {cfg.gallery!r} "
                f"({skipped} already enrolled)")  # fmt: skip
    tally = _Tally()
    if todo.num_rows:
        cluster.connect()
        tally = _enrol(cfg, storage, store, todo, sha256, faces_input or cfg.aligned, faces_input)
    tally.gallery_faces += len(existing) if existing is not None else 0
    tally.identities |= set(existing.identities.tolist()) if existing is not None else set()
    result = _result(cfg, storage, store, inputs.num_rows, skipped, tally, time.perf_counter() - t_start)
    _print_summary(result)
    if todo.num_rows and not tally.enrolled and not skipped:  # none of these inputs is in the gallery
        top = ", ".join(f"{reason} {n}" for reason, n in tally.reasons.most_common(3))
        raise UserError(f"no face enrolled from {todo.num_rows} input(s) ({top}); see {result.rejects_file}")
    return result


def _inputs(cfg: EnrolConfig, storage: Storage) -> tuple[pa.Table, bool]:
    """(source, identity, size, image_id) of every input, and whether they are a preprocess output's faces."""
    src = normalize(cfg.input)
    if aligned.is_committed(src, storage):
        import pyarrow.parquet as pq

        fs, path = storage.resolve(join(src, aligned.DATA))
        table = pq.read_table(path, filesystem=fs, columns=["source", "identity", "image"])
        table = table.sort_by([("identity", "ascending"), ("source", "ascending")]).slice(0, cfg.limit)
        return table.append_column("image_id", table.column("source")), True
    table, ignored = list_inputs(cfg, storage)
    if ignored:
        console.say(f"warning: ignored {ignored} file(s) directly under {src} (not in an identity folder)")
    prefix = src.rstrip("/") + "/"
    ids = [s[len(prefix) :] if s.startswith(prefix) else s for s in table.column("source").to_pylist()]
    return table.append_column("image_id", pa.array(ids, pa.string())), False


class _Tally:
    def __init__(self) -> None:
        self.enrolled, self.segments, self.gallery_faces = 0, 0, 0
        self.identities: set[str] = set()  # of the gallery afterwards: counted, not re-read
        self.reasons: Counter[str] = Counter()
        self.rejects: list[pa.Table] = []


def _enrol(
    cfg: EnrolConfig, storage: Storage, store: GalleryStore, todo: pa.Table, sha256: str, faces: bool, rows: bool
) -> _Tally:
    """Stream ``todo`` through the pipeline; append a segment every ``rows_per_segment`` faces."""
    tally, pending = _Tally(), OUT_SCHEMA.empty_table()

    def flush(at_least: int) -> None:
        """Append the pending faces as segments of ``rows_per_segment`` while ``at_least`` of them wait."""
        nonlocal pending
        while pending.num_rows and pending.num_rows >= at_least:
            part, pending = pending.slice(0, cfg.rows_per_segment), pending.slice(cfg.rows_per_segment)
            embeddings = np.asarray(part.column("embedding").to_pylist(), dtype=np.float32)
            store.append(cfg.gallery, part.column("identity").to_pylist(), embeddings,
                         part.column("source").to_pylist(), part.column("image_id").to_pylist(), sha256)  # fmt: skip
            tally.enrolled += part.num_rows
            tally.gallery_faces += part.num_rows
            tally.identities.update(part.column("identity").to_pylist())
            tally.segments += 1

    with console.progress("enrol", todo.num_rows, "img") as advance:
        for part in _pipeline(cfg, storage, todo, sha256, faces, rows).iter_batches(
            batch_size=None, batch_format="pyarrow"
        ):
            ok = pc.is_null(part.column("reason"))
            rejected = part.filter(pc.invert(ok))
            if rejected.num_rows:
                tally.rejects.append(rejected.select(["source", "identity", "reason", "detail"]))
                tally.reasons.update(rejected.column("reason").to_pylist())
            pending = pa.concat_tables([pending, part.filter(ok)])
            flush(at_least=cfg.rows_per_segment)
            advance(part.num_rows)
    flush(at_least=1)
    return tally


def _pipeline(cfg: EnrolConfig, storage: Storage, todo: pa.Table, sha256: str, faces: bool, rows: bool):
    """read (or take the stored faces) → embed (n actors), as one streaming Ray Dataset (not started yet)."""
    import ray
    import ray.data

    n, actor_args = cluster.actor_pool(cfg.device, cfg.num_actors)
    ds = input_dataset(todo, cfg.batch_size, n)
    if rows:
        ds = ds.map_batches(face_stage, batch_size=None, batch_format="pyarrow", num_cpus=0)
    else:
        ds = read_by_stage_actors(ds, storage, cfg.max_bytes, cfg.io_threads, actors=max(1, -(-n // 4)))
    embedder = dict(cfg=cfg, identity_net_sha256=sha256, aligned_input=faces)
    return ds.map_batches(Embedder, batch_size=cfg.batch_size, batch_format="pyarrow", **actor_args,
                          compute=ray.data.ActorPoolStrategy(size=n), fn_constructor_kwargs=embedder)  # fmt: skip


def _result(
    cfg: EnrolConfig, storage: Storage, store: GalleryStore, seen: int, skipped: int, tally: _Tally, seconds: float
) -> EnrolResult:
    from ipsr_model.paths import logs_dir

    rejects_file = None
    if tally.rejects:
        import pyarrow.parquet as pq

        stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}"
        rejects_file = cfg.rejects or str(logs_dir() / f"enrol-{cfg.gallery}-{stamp}-rejects.parquet")
        buf = pa.BufferOutputStream()
        pq.write_table(pa.concat_tables(tally.rejects).sort_by("source"), buf)
        storage.write_bytes(normalize(rejects_file), buf.getvalue().to_pybytes())
    return EnrolResult(
        gallery=cfg.gallery,
        store=store.root,
        seen=seen,
        already_enrolled=skipped,
        enrolled=tally.enrolled,
        rejected=dict(tally.reasons.most_common()),
        segments_written=tally.segments,
        gallery_faces=tally.gallery_faces,
        gallery_identities=len(tally.identities),
        seconds=round(seconds, 2),
        faces_per_s=round(tally.enrolled / max(seconds, 1e-9), 2),
        rejects_file=rejects_file,
    )


def _print_summary(result: EnrolResult) -> None:
    rejected = ", ".join(f"{r} {n}" for r, n in result.rejected.items()) or "0"
    console.summary(f"ipsr enrol → {result.store}/{result.gallery}", [
        ("inputs", result.seen), ("already enrolled", result.already_enrolled), ("enrolled now", result.enrolled),
        ("rejected", rejected), ("segments written", result.segments_written),
        ("gallery", f"{result.gallery_faces} faces, {result.gallery_identities} identities"),
        ("time", f"{result.seconds} s ({result.faces_per_s} faces/s)"), ("rejects", result.rejects_file or "none"),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.enrol [flags]``: the same command as ``ipsr enrol`` (generated from its config)."""
    run_main(job_command("enrol", run), argv)


if __name__ == "__main__":
    main()
