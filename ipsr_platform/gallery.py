"""Enrolled galleries: append-only, so that no write can erase another, on a local path or s3://.

    ROOT/<name>/segments/<time_ns>-<uuid>.parquet   one immutable file per enrolment request: identity, embedding
                                                    (fixed-size list<float32>[512], L2-normalised), source (upload
                                                    name), image_id (client-chosen, optional), identity_net_sha256
    ROOT/<name>/deletes/<time_ns>-<uuid>.json       a tombstone: {"identity": ...} hides that identity's rows in every
                                                    segment named before it (GDPR-style removal of one person)
    ROOT/<name>/gallery.parquet                     the pre-segment layout, read as the oldest segment

Every replica writes only new, uniquely named files, so concurrent enrolments on any number of replicas all land
(the old read-modify-write of one file lost a third of them at 2 replicas). Readers merge the segments, apply the
tombstones, and keep the first row of a repeated ``image_id`` (a retried request is not stored twice). Names start
with the writer's clock, which orders tombstones against segments; ``compact`` merges what it listed into one segment
named after the newest one it merged, and removes only those files: a write that lands meanwhile survives.
"""

from __future__ import annotations

import functools
import io
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ipsr_model.errors import UserError
from ipsr_platform.storage import Storage, join, normalize

SEGMENTS, DELETES, LEGACY = "segments", "deletes", "gallery.parquet"
LEGACY_NAME = f"{0:020d}-legacy"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


def check_name(name: str) -> str:
    """Gallery names become a folder: no slashes, no '..'."""
    if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
        raise UserError(f"gallery name must match {NAME_PATTERN} (it names a folder), got {name!r}")
    return name


class WeightsMismatch(UserError):
    """Embeddings made by another identity network: not comparable (HTTP 409)."""


class UnreadableSegment(UserError):
    """A gallery file that is not a gallery segment (truncated, foreign, hand-edited): named, not a bare 500."""


def _new_name() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Gallery:
    identities: np.ndarray  # [N] str
    embeddings: np.ndarray  # [N, D] float32, L2-normalised
    sources: np.ndarray  # [N] str
    image_ids: np.ndarray  # [N] str or None
    identity_net_sha256: str
    stamp: tuple = ()  # the segment and tombstone names it was read from: tells a reload whether anything changed

    def __len__(self) -> int:
        return len(self.identities)

    @functools.cached_property
    def image_id_set(self) -> frozenset:
        return frozenset(i for i in self.image_ids.tolist() if i is not None)

    def identity_codes(self) -> tuple[list[str], np.ndarray]:
        """(identity names sorted, each row's index into them): a search's per-identity max needs dense codes.
        One rule for `ipsr serve` and `ipsr identify`, so ties between identities break the same way."""
        unique, codes = np.unique(self.identities.astype(str), return_inverse=True)
        return unique.tolist(), codes.astype(np.int64)

    @staticmethod
    def empty(identity_net_sha256: str = "", stamp: tuple = ()) -> Gallery:
        none = np.empty(0, dtype=object)
        return Gallery(none, np.empty((0, 0), np.float32), none, none, identity_net_sha256, stamp)


def _table(identities, embeddings: np.ndarray, sources, image_ids, sha256: str) -> pa.Table:
    n, dim = embeddings.shape
    return pa.table({
        "identity": pa.array(list(identities), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).reshape(-1)), dim),
        "source": pa.array(list(sources), pa.string()),
        "image_id": pa.array(list(image_ids), pa.string()),
        "identity_net_sha256": pa.array([sha256] * n, pa.string()),
        "enrolled_at": pa.array([time.time()] * n, pa.float64()),
    })  # fmt: skip


def _read_rows(fs: pafs.FileSystem, path: str, with_embeddings: bool = True) -> tuple[pa.Table, np.ndarray]:
    """Embeddings streamed in batches into one array: reading a million-face segment whole peaks at 8.4 GB (its
    bytes, Arrow's decoded column and the decoder's buffers for a 2 GB matrix) and 2.8 GB this way. Without
    them: the other columns alone and a zero-width array (Parquet reads only the columns asked for)."""
    with fs.open_input_file(path) as f:
        file = pq.ParquetFile(f, buffer_size=1 << 22, pre_buffer=False)
        field = file.schema_arrow.field("embedding")
        table = file.read(columns=[n for n in file.schema_arrow.names if n != "embedding"])
        if not with_embeddings:
            return table, np.empty((file.metadata.num_rows, 0), np.float32)
        embeddings, at = np.empty((file.metadata.num_rows, field.type.list_size), np.float32), 0
        for batch in file.iter_batches(batch_size=1 << 16, columns=["embedding"]):
            embeddings[at : at + batch.num_rows] = batch.column(0).flatten().to_numpy().reshape(batch.num_rows, -1)
            at += batch.num_rows
    return table, embeddings


def _relative(entries: list[pafs.FileInfo], folder: str) -> list[str]:
    """The files of a listing of (or under) ``folder``, as paths relative to it."""
    return [e.path[len(folder) + 1 :] for e in entries if e.type == pafs.FileType.File]


def _stems(files: list[str], sub: str, suffix: str) -> list[str]:
    """The sorted names of ``sub/<name><suffix>`` among paths relative to a gallery folder."""
    return sorted(f[len(sub) + 1 : -len(suffix)] for f in files if f.startswith(f"{sub}/") and f.endswith(suffix))


class GalleryStore:
    def __init__(self, root: str, storage: Storage):
        self.root = normalize(root)
        self.storage = storage

    def folder(self, name: str) -> str:
        return join(self.root, check_name(name))

    def listing(self, name: str) -> tuple[list[str], list[str], bool]:
        """(segment names, tombstone names, legacy file present), sorted; one recursive listing."""
        folder = self.folder(name)
        try:
            entries = self.storage.list(folder, recursive=True)
        except UserError:  # a missing folder lists as nothing on S3 and raises locally
            return [], [], False
        files = _relative(entries, folder)
        return _stems(files, SEGMENTS, ".parquet"), _stems(files, DELETES, ".json"), LEGACY in files

    def tombstones(self, name: str) -> tuple[str, ...] | None:
        """The tombstone names alone, sorted (as in `listing`), or None when the gallery itself is gone: one short
        listing (two without tombstones), cheap enough for every identify."""
        folder = self.folder(name)
        try:
            entries = self.storage.list(join(folder, DELETES))
        except UserError:  # no tombstone yet: no folder locally, nothing listed on S3
            entries = []
        if not entries:
            try:
                return () if self.storage.list(folder) else None
            except UserError:  # deleted (through another replica, maybe)
                return None
        return tuple(_stems(_relative(entries, folder), DELETES, ".json"))

    def _read_segment(self, name: str, segment: str, with_embeddings: bool = True) -> tuple[pa.Table, np.ndarray]:
        """(the segment's rows without their embeddings, the embeddings as float32 [rows, D] or [rows, 0])."""
        path = join(self.folder(name), LEGACY if segment == LEGACY_NAME else f"{SEGMENTS}/{segment}.parquet")
        try:
            table, embeddings = self.storage.call("read", path, lambda fs, p: _read_rows(fs, p, with_embeddings))
        except (pa.ArrowException, ValueError, KeyError) as err:  # not Parquet, or no fixed-size embedding column
            raise UnreadableSegment(
                f"{path} is not a readable gallery segment ({type(err).__name__}: {err}); "
                "restore it or delete that file"
            ) from None
        if "image_id" not in table.column_names:
            table = table.append_column("image_id", pa.nulls(table.num_rows, pa.string()))
        return table.append_column("segment", pa.array([segment] * table.num_rows, pa.string())), embeddings

    def load(self, name: str, with_embeddings: bool = True) -> Gallery | None:
        """The merged gallery, or None when nothing was ever enrolled (or it was deleted). ``with_embeddings``
        False: everything but the embeddings (zero-width), for who only asks what a gallery holds."""
        segments, deletes, legacy = self.listing(name)
        names = ([LEGACY_NAME] if legacy else []) + segments
        if not names:
            return None
        with ThreadPoolExecutor(max_workers=16) as pool:  # S3: many small objects, latency-bound
            segments_read = list(pool.map(lambda s: self._read_segment(name, s, with_embeddings), names))
            tombstones = list(
                pool.map(
                    lambda d: (d, json.loads(self.storage.read_bytes(join(self.folder(name), f"{DELETES}/{d}.json")))),
                    deletes,
                )
            )
        return self._merge(segments_read, tombstones, (tuple(segments), tuple(deletes), legacy))

    def added_since(self, name: str, gallery: Gallery) -> Gallery | None:
        """Only the rows enrolled since ``gallery`` was read (with the new stamp; none when nothing changed), merged
        as `load` would merge them after its rows; None when more than that changed and a full `load` is needed.

        Enrolments only add segments, named by time: when the old segments are a prefix of the new listing, no
        tombstone or legacy file changed and every tombstone predates the new segments, the old rows stand as
        they are, so a replica reads kilobytes instead of re-reading a million-face gallery per enrolment."""
        segments, deletes, legacy = self.listing(name)
        old_segments, old_deletes, old_legacy = gallery.stamp
        added = segments[len(old_segments) :]
        if (
            tuple(segments[: len(old_segments)]) != old_segments
            or (tuple(deletes), legacy) != (old_deletes, old_legacy)
            or (added and deletes and deletes[-1] >= added[0])
        ):
            return None
        stamp = (tuple(segments), tuple(deletes), legacy)
        if not added:
            return Gallery.empty(gallery.identity_net_sha256, stamp)
        with ThreadPoolExecutor(max_workers=16) as pool:
            read = list(pool.map(lambda s: self._read_segment(name, s), added))
        delta = self._merge(read, [], stamp, held=gallery.image_id_set)
        if gallery.identity_net_sha256 and delta.identity_net_sha256 not in ("", gallery.identity_net_sha256):
            raise WeightsMismatch("gallery segments were embedded by 2 identity networks")
        return delta

    @staticmethod
    def _merge(
        segments: list[tuple[pa.Table, np.ndarray]],
        tombstones: list[tuple[str, dict]],
        stamp: tuple,
        held: frozenset = frozenset(),
    ) -> Gallery:
        """One gallery from segments in name order: rows older than their identity's tombstone are hidden, and a
        row whose image_id came earlier (or is in ``held``: rows merged before) is a retry, not kept again."""
        segments = [(t, e) for t, e in segments if t.num_rows]
        if not segments:
            return Gallery.empty(stamp=stamp)
        table = pa.concat_tables(
            [t.select(["identity", "source", "image_id", "identity_net_sha256", "segment"]) for t, _ in segments],
            promote_options="permissive",
        )
        identity, segment = table.column("identity").to_pylist(), table.column("segment").to_pylist()
        image_id = table.column("image_id").to_pylist()
        keep, seen = np.ones(table.num_rows, bool), set(held)
        removed = {body["identity"]: when for when, body in tombstones}  # in name order: the last is the newest
        for i in range(table.num_rows):
            if identity[i] in removed and segment[i] < removed[identity[i]]:
                keep[i] = False
            elif image_id[i] is not None:
                keep[i] = image_id[i] not in seen
                seen.add(image_id[i])
        shas = set(table.column("identity_net_sha256").unique().to_pylist())
        if len(shas) > 1:
            raise WeightsMismatch(f"gallery segments were embedded by {len(shas)} identity networks")
        # One segment (a compacted gallery) is used as read: at a million faces each copy is 2 GB. Every row may be
        # hidden (the last person removed, or only retries new): an empty gallery of the same width.
        embeddings = segments[0][1] if len(segments) == 1 else np.concatenate([e for _, e in segments])
        if not keep.all():  # a filter copies: only when something is hidden
            table, embeddings = table.filter(pa.array(keep)), embeddings[keep]
        identities, sources, image_ids = (
            np.asarray(table.column(c).to_pylist(), dtype=object) for c in ("identity", "source", "image_id")
        )
        return Gallery(identities, embeddings, sources, image_ids, shas.pop(), stamp)

    def append(
        self,
        name: str,
        identities: list[str],
        embeddings: np.ndarray,
        sources: list[str],
        image_ids: list[str | None],
        sha256: str,
    ) -> str:
        """One new immutable segment; returns its name. Nothing existing is read or rewritten."""
        segment = _new_name()
        buf = io.BytesIO()
        pq.write_table(_table(identities, embeddings, sources, image_ids, sha256), buf)
        self.storage.write_bytes(join(self.folder(name), f"{SEGMENTS}/{segment}.parquet"), buf.getvalue())
        return segment

    def delete_identity(self, name: str, identity: str) -> None:
        """A tombstone: rows of ``identity`` written before it disappear for every reader."""
        body = json.dumps({"identity": identity, "deleted_at": time.time()}).encode()
        self.storage.write_bytes(join(self.folder(name), f"{DELETES}/{_new_name()}.json"), body)

    def delete(self, name: str) -> None:
        self.storage.delete(self.folder(name))

    def compact(self, name: str) -> tuple[int, int]:
        """Merge every segment and tombstone listed now into one segment; returns (files merged, rows kept)."""
        segments, deletes, legacy = self.listing(name)
        gallery = self.load(name)
        if gallery is None:
            raise UserError(f"gallery {name!r} has nothing to compact")
        if gallery.stamp != (tuple(segments), tuple(deletes), legacy):
            raise UserError(f"gallery {name!r} changed while it was read; run compact again")
        newest = max(segments, default=LEGACY_NAME)
        merged = f"{newest}-compacted-{uuid.uuid4().hex[:8]}"  # sorts right after the newest merged segment
        if len(gallery):
            buf = io.BytesIO()
            pq.write_table(
                _table(
                    gallery.identities,
                    gallery.embeddings,
                    gallery.sources,
                    gallery.image_ids,
                    gallery.identity_net_sha256,
                ),
                buf,
            )
            self.storage.write_bytes(join(self.folder(name), f"{SEGMENTS}/{merged}.parquet"), buf.getvalue())
        folder = self.folder(name)
        stale = [f"{SEGMENTS}/{s}.parquet" for s in segments] + [f"{DELETES}/{d}.json" for d in deletes if d <= newest]
        for path in stale + ([LEGACY] if legacy else []):
            self.storage.delete(join(folder, path))
        return len(stale) + legacy, len(gallery)
