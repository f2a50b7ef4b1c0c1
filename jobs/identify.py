"""`ipsr identify`: bulk search of probe images against a gallery, as a Ray Data job.

    list (driver)            every file under PROBES (local or s3://), recursively; a probe is named by its path
                             under PROBES
    → read (Reader actors)   bytes; too_large / io_error rejects
    → search (n actors)      decode; a low-resolution probe (both sides ≤ lr_max_side) is stretched to 128×128, a
                             larger one aligned by MTCNN unless --aligned (then its centre square) — the service's
                             rule (``faces.probe_face``); SR (U-Net, back-projected) → FaceNet → top-k identities of the
                             gallery (``identify.identify_batch``, the service's batch function)
    → write (driver)         OUT/matches.parquet + matches.csv (probe, rank, identity, score, super_resolved),
                             OUT/rejects.parquet, OUT/sr/<probe>.png with --save-sr (written by the actors)

The gallery is read once, by the driver, and put in Ray's object store once: every actor on a node maps the same
shared-memory matrix (already in the search's dtype) instead of reading the store itself. matches.parquet is
written last, so its presence means a whole run.
"""

from __future__ import annotations

import io
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipsr_model.errors import UserError
from ipsr_platform import cluster, console
from ipsr_platform.commands import job_command, run_main
from ipsr_platform.config import IdentifyConfig
from ipsr_platform.faces import FaceAligner, Rejected
from ipsr_platform.gallery import GalleryStore, WeightsMismatch, check_name
from ipsr_platform.storage import Storage, join, normalize
from jobs.preprocess import input_dataset, read_by_stage_actors

MATCHES, CSV, REJECTS, SR = "matches.parquet", "matches.csv", "rejects.parquet", "sr"
OUT_SCHEMA = pa.schema(
    [
        ("probe", pa.string()),
        ("rank", pa.int32()),  # null when rejected
        ("identity", pa.string()),
        ("score", pa.float64()),  # cosine, rounded to 6 places as the service answers it
        ("super_resolved", pa.bool_()),
        ("reason", pa.string()),  # null when searched
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class IdentifyResult:
    gallery: str
    model: str  # the version searched with (an alias resolved once)
    probes: int  # files under --probes
    identified: int  # probes searched (the others are in rejects_file)
    super_resolved: int
    rejected: dict[str, int]  # reason → probes, most common first
    seconds: float
    probes_per_s: float
    matches_file: str
    rejects_file: str


class SharedGallery:
    """A gallery as `identify_batch` searches it (``identify.Searchable``), over the object store's shared rows."""

    def __init__(self, shared: tuple[np.ndarray, np.ndarray, list[str]], device):
        import torch

        embeddings, codes, self.names = shared
        with warnings.catch_warnings():  # the shared arrays are read-only; the search never writes them
            warnings.simplefilter("ignore", UserWarning)
            self.embeddings = torch.from_numpy(embeddings).to(device)
            self.codes = torch.from_numpy(codes).to(device)


class Searcher:
    """The Ray actor: FaceNet, the generator, the gallery (and MTCNN, at the first HR probe unless ``aligned``) load
    once per process."""

    def __init__(self, cfg: IdentifyConfig, model: str, tracking_uri: str, gallery: list, sha256: str, out: str,
                 storage: Storage):  # fmt: skip
        import ray
        import torch

        from ipsr_model.identity import IdentityNet
        from ipsr_platform.models import load_generator

        torch.set_num_threads(1)  # one torch thread per actor: processes scale better than intra-op threads
        self.cfg, self.device, self.out, self.storage = cfg, torch.device(cfg.device), out, storage
        self.net = IdentityNet(cfg.identity_weights).to(self.device, memory_format=torch.channels_last).eval()
        if self.net.weights_sha256 != sha256:
            raise RuntimeError(f"actor loaded identity weights {self.net.weights_sha256[:12]}…, the gallery holds "
                               f"{sha256[:12]}…: the '{cfg.identity_weights}' cache differs")  # fmt: skip
        loaded = load_generator(model, tracking_uri, allow_pickle=cfg.allow_pickle_models)
        self.generator = loaded.module.to(self.device)
        self.aligner: FaceAligner | None = None  # built at the first HR probe: LR crops never need it
        self.gallery = SharedGallery(ray.get(gallery[0]), self.device)  # (a bare ref would be resolved per call)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ipsr_model.identify import identify_batch
        from ipsr_platform.faces import make_probe

        rows = batch.select(["probe", "reason", "detail"]).to_pylist()
        faces = self._faces(rows, batch.column("data").to_pylist())
        want = self.cfg.super_resolve
        probes = [make_probe(face, lr, want, self.cfg.back_projection, gallery=self.gallery, top_k=self.cfg.top_k,
                             want_image=self.cfg.save_sr) for face, lr in faces.values()]  # fmt: skip
        answers = (
            identify_batch(self.generator, self.net, probes, self.device, self.cfg.gallery_chunk) if probes else []
        )
        out = []
        for row in rows:
            if row["reason"]:
                out.append({**row, "rank": None, "identity": None, "score": None, "super_resolved": None})
        for i, answer in zip(faces, answers):
            if self.cfg.save_sr:
                self._save(rows[i]["probe"], answer["image"])
            out += [{"probe": rows[i]["probe"], "super_resolved": answer["super_resolved"], "reason": None,
                     "detail": None, **match} for match in answer["matches"]]  # fmt: skip
        return pa.Table.from_pylist(out, schema=OUT_SCHEMA)

    def _faces(self, rows: list[dict], blobs: list[bytes | None]) -> dict[int, tuple[Any, Any]]:
        """Row → (its 128×128 face, the LR probe or None: `probe_face`); a row that has none gets its ``reason``."""
        from ipsr_platform.faces import decode, probe_face

        faces, to_align = {}, []
        for i, row in enumerate(rows):
            if row["reason"]:
                continue
            try:
                img = decode(blobs[i], self.cfg.max_pixels)
            except Rejected as err:
                row.update(reason=err.reason, detail=err.detail)
                continue
            face, lr = probe_face(img, self.cfg.lr_max_side)
            if lr is not None or self.cfg.aligned:  # (an LR crop is too small for a detector: a face crop already)
                faces[i] = face, lr
            else:
                to_align.append(i)
        if to_align:
            if self.aligner is None:
                self.aligner = FaceAligner(self.cfg.device, max_pixels=self.cfg.max_pixels)
            for i, found in zip(to_align, self.aligner.align([blobs[i] for i in to_align])):
                if isinstance(found, Rejected):
                    rows[i].update(reason=found.reason, detail=found.detail)
                else:
                    faces[i] = found.face, None
        return dict(sorted(faces.items()))

    def _save(self, probe: str, image) -> None:
        from ipsr_model.images import to_pil
        from ipsr_platform.faces import encode_png

        self.storage.write_bytes(join(self.out, SR, f"{probe}.png"), encode_png(to_pil(image)[0]))


# --- driver -----------------------------------------------------------------------------------------------------


def run(cfg: IdentifyConfig, storage: Storage | None = None) -> IdentifyResult:
    """Search every probe; write the results; return the summary. When no probe could be searched: the results
    (rejects) are still written, then a UserError with the top reasons."""
    from ipsr_platform import tracking
    from ipsr_platform.models import load_generator

    storage = storage or Storage.from_env()
    t_start = time.perf_counter()
    check_name(cfg.gallery)
    out = normalize(cfg.out)
    if (out.rstrip("/") + "/").startswith(normalize(cfg.probes).rstrip("/") + "/"):
        raise UserError(f"--out {out} is inside --probes: a rerun would search the results as probes")
    _claim(out, storage, cfg.overwrite)
    probes = _probes(cfg, storage)
    shared, sha256 = _gallery(cfg, storage)
    # Loaded here once so that a wrong URI is one line, not a traceback per actor; the actors load this version.
    loaded = load_generator(cfg.generator, allow_pickle=cfg.allow_pickle_models)
    model = f"models:/{loaded.name}/{loaded.version}" if loaded.version else cfg.generator
    trained_with = loaded.tags.get(tracking.TAG_IDENTITY_NET)
    if trained_with and trained_with != sha256:
        console.say(f"warning: {model} was trained against identity net {trained_with[:12]}…, the gallery holds "
                    f"{sha256[:12]}… embeddings")  # fmt: skip
    console.say(f"identify {probes.num_rows} probe(s) against gallery {cfg.gallery!r} ({len(shared[0])} faces, "
                f"{len(shared[2])} identities) with {model}")  # fmt: skip
    cluster.connect()
    import ray

    gallery_ref = ray.put(shared)
    del shared
    matches, rejects = _search(cfg, storage, probes, [gallery_ref], model, tracking.tracking_uri(), sha256, out)
    result = _write(cfg, storage, out, model, probes.num_rows, matches, rejects, time.perf_counter() - t_start)
    _print_summary(result)
    if not result.identified:
        top = ", ".join(f"{reason} {n}" for reason, n in result.rejected.items())
        raise UserError(f"no probe searched of {probes.num_rows} ({top}); see {result.rejects_file}")
    return result


def _claim(out: str, storage: Storage, overwrite: bool) -> None:
    """Refuse to mix two runs' results in ``out``; with ``overwrite``, remove the earlier run's first."""
    if not storage.exists(join(out, MATCHES)) and not storage.exists(join(out, REJECTS)):
        return
    if not overwrite:
        raise UserError(f"{out} holds the results of an earlier run: pass another --out, or --overwrite")
    for name in (MATCHES, CSV, REJECTS, SR):  # the commit mark first: a crash in here leaves no whole-looking run
        storage.delete(join(out, name))


def _probes(cfg: IdentifyConfig, storage: Storage) -> pa.Table:
    """(source, probe, size) of every file under ``cfg.probes``, sorted by probe name."""
    import pyarrow.fs as pafs

    src = normalize(cfg.probes)
    if not storage.is_dir(src):
        raise UserError(f"probes folder not found: {src}")
    files = sorted((e for e in storage.list(src, recursive=True) if e.type == pafs.FileType.File),
                   key=lambda e: e.path)[: cfg.limit]  # fmt: skip
    if not files:
        raise UserError(f"no probe files under {src}")
    prefix = src.rstrip("/") + "/"
    return pa.table(
        {
            "source": [e.path for e in files],
            "probe": [e.path[len(prefix) :] if e.path.startswith(prefix) else e.path for e in files],
            "size": pa.array([-1 if e.size is None else e.size for e in files], pa.int64()),
        }
    )


def _gallery(cfg: IdentifyConfig, storage: Storage) -> tuple[tuple[np.ndarray, np.ndarray, list[str]], str]:
    """The gallery as the actors search it — (rows in the search's dtype, identity codes, names) — and the sha256
    of the identity net that made it (checked against ``--identity-weights``)."""
    from ipsr_model.paths import galleries_dir
    from ipsr_model.weights import load_identity_weights

    store = GalleryStore(normalize(cfg.galleries or str(galleries_dir())), storage)
    gallery = store.load(cfg.gallery)
    if gallery is None or not len(gallery):
        raise UserError(f"gallery {cfg.gallery!r} not found in {store.root} (enrol into it first: ipsr enrol)")
    _, sha256 = load_identity_weights(cfg.identity_weights)
    if gallery.identity_net_sha256 != sha256:
        raise WeightsMismatch(
            f"gallery {cfg.gallery!r} holds embeddings of identity net {gallery.identity_net_sha256[:12]}…, not "
            f"{sha256[:12]}… ({cfg.identity_weights}): pass the gallery's --identity-weights"
        )
    names, codes = gallery.identity_codes()
    dtype = cfg.gallery_dtype if cfg.gallery_dtype != "auto" else "float16" if cfg.device == "cuda" else "float32"
    return (gallery.embeddings.astype(dtype), codes, names), sha256


def _search(cfg: IdentifyConfig, storage: Storage, probes: pa.Table, gallery: list, model: str, tracking_uri: str,
            sha256: str, out: str) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """Stream the probes through read → search; (match rows, reject rows)."""
    import ray
    import ray.data

    n, actor_args = cluster.actor_pool(cfg.device, cfg.num_actors)
    ds = input_dataset(probes, cfg.batch_size, n)
    ds = read_by_stage_actors(ds, storage, cfg.max_bytes, cfg.io_threads, actors=max(1, -(-n // 4)))
    searcher = dict(cfg=cfg, model=model, tracking_uri=tracking_uri, gallery=gallery, sha256=sha256, out=out,
                    storage=storage)  # fmt: skip
    ds = ds.map_batches(Searcher, batch_size=cfg.batch_size, batch_format="pyarrow", **actor_args,
                        compute=ray.data.ActorPoolStrategy(size=n), fn_constructor_kwargs=searcher)  # fmt: skip
    parts = []
    with console.progress("identify", probes.num_rows, "probe") as advance:
        for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(part)
            advance(pc.count_distinct(part.column("probe")).as_py())
    table = pa.concat_tables(parts) if parts else OUT_SCHEMA.empty_table()
    ok = pc.is_null(table.column("reason"))
    matches = table.filter(ok).select(["probe", "rank", "identity", "score", "super_resolved"])
    rejects = table.filter(pc.invert(ok)).select(["probe", "reason", "detail"])
    return matches.sort_by([("probe", "ascending"), ("rank", "ascending")]), rejects.sort_by("probe")


def _write(cfg: IdentifyConfig, storage: Storage, out: str, model: str, seen: int, matches: pa.Table,
           rejects: pa.Table, seconds: float) -> IdentifyResult:  # fmt: skip
    """rejects, the CSV, then matches.parquet: the last file is the mark of a whole run."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    def parquet(table: pa.Table) -> bytes:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        return buf.getvalue().to_pybytes()

    storage.write_bytes(join(out, REJECTS), parquet(rejects))
    text = io.BytesIO()
    pcsv.write_csv(matches, text)
    storage.write_bytes(join(out, CSV), text.getvalue())
    storage.write_bytes(join(out, MATCHES), parquet(matches))

    def probes_in(table: pa.Table) -> int:
        return pc.count_distinct(table.column("probe")).as_py() if table.num_rows else 0

    identified = probes_in(matches)
    return IdentifyResult(
        gallery=cfg.gallery,
        model=model,
        probes=seen,
        identified=identified,
        super_resolved=probes_in(matches.filter(matches.column("super_resolved"))),
        rejected=dict(Counter(rejects.column("reason").to_pylist()).most_common()),
        seconds=round(seconds, 2),
        probes_per_s=round(identified / max(seconds, 1e-9), 2),
        matches_file=join(out, MATCHES),
        rejects_file=join(out, REJECTS),
    )


def _print_summary(result: IdentifyResult) -> None:
    rejected = ", ".join(f"{r} {n}" for r, n in result.rejected.items()) or "0"
    console.summary(f"ipsr identify → {result.matches_file}", [
        ("gallery", result.gallery), ("model", result.model), ("probes", result.probes),
        ("searched", f"{result.identified} ({result.super_resolved} super-resolved)"), ("rejected", rejected),
        ("time", f"{result.seconds} s ({result.probes_per_s} probes/s)"),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.identify [flags]``: the same command as ``ipsr identify`` (generated from its config)."""
    run_main(job_command("identify", run), argv)


if __name__ == "__main__":
    main()
