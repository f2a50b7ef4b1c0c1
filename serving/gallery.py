"""Enrolled galleries: one Parquet file per gallery under a store root (local path or s3://).

    ROOT/<name>/gallery.parquet    identity (string), embedding (fixed-size list<float32>[512], L2-normalised),
                                   source (the uploaded file name), identity_net_sha256, enrolled_at

A gallery is small (512 floats per face: 2 KB; a million faces is 2 GB), so every enrolment rewrites the whole
file: written next to the target, then moved over it, so a reader (another replica, a restarted one) sees the
old or the new gallery, never half of one. Concurrent enrolments into the *same* gallery on different replicas
are last-writer-wins; within a replica they are serialised by the caller.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ipsr_model.errors import UserError
from ipsr_platform.storage import Storage, join, normalize

FILE = "gallery.parquet"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


def check_name(name: str) -> str:
    """Gallery names become a folder: no slashes, no '..'."""
    if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
        raise UserError(f"gallery name must match {NAME_PATTERN} (it names a folder), got {name!r}")
    return name


@dataclass(frozen=True)
class Gallery:
    identities: np.ndarray  # [N] str
    embeddings: np.ndarray  # [N, D] float32, L2-normalised
    sources: np.ndarray  # [N] str
    identity_net_sha256: str
    stamp: tuple = ()  # (mtime, size) of the file it was read from: tells a reload whether it changed

    def __len__(self) -> int:
        return len(self.identities)

    def add(self, identities: list[str], embeddings: np.ndarray, sources: list[str], sha256: str) -> Gallery:
        if len(self) and sha256 != self.identity_net_sha256:
            raise UserError(
                f"gallery was enrolled with identity net {self.identity_net_sha256[:12]}…, this replica uses "
                f"{sha256[:12]}…: embeddings would not be comparable; enrol into a new gallery"
            )
        dim = embeddings.shape[1] if len(embeddings) else self.embeddings.shape[1] if len(self) else 0
        return Gallery(
            identities=np.concatenate([self.identities, np.asarray(identities, dtype=object)]),
            embeddings=np.concatenate([self.embeddings.reshape(-1, dim), embeddings.astype(np.float32)]),
            sources=np.concatenate([self.sources, np.asarray(sources, dtype=object)]),
            identity_net_sha256=sha256,
        )

    @staticmethod
    def empty() -> Gallery:
        none = np.empty(0, dtype=object)
        return Gallery(none, np.empty((0, 0), np.float32), none, "")


class GalleryStore:
    def __init__(self, root: str, storage: Storage):
        self.root = normalize(root)
        self.storage = storage

    def uri(self, name: str) -> str:
        return join(self.root, check_name(name), FILE)

    def stamp(self, name: str) -> tuple:
        info = self.storage.info(self.uri(name))
        return () if info.size is None else (info.mtime_ns, info.size)

    def load(self, name: str) -> Gallery | None:
        uri = self.uri(name)
        if not self.storage.exists(uri):
            return None
        stamp = self.stamp(name)
        table = pq.read_table(io.BytesIO(self.storage.read_bytes(uri)))
        if table.num_rows == 0:
            return Gallery.empty()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return Gallery(
            identities=np.asarray(table.column("identity").to_pylist(), dtype=object),
            embeddings=flat.astype(np.float32).reshape(table.num_rows, -1),
            sources=np.asarray(table.column("source").to_pylist(), dtype=object),
            identity_net_sha256=table.column("identity_net_sha256")[0].as_py(),
            stamp=stamp,
        )

    def save(self, name: str, gallery: Gallery) -> Gallery:
        """Write atomically (temporary file, then move); returns the gallery with its new stamp."""
        n, dim = gallery.embeddings.shape
        table = pa.table(
            {
                "identity": pa.array(gallery.identities.tolist(), pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(gallery.embeddings.reshape(-1)), dim),
                "source": pa.array(gallery.sources.tolist(), pa.string()),
                "identity_net_sha256": pa.array([gallery.identity_net_sha256] * n, pa.string()),
                "enrolled_at": pa.array([time.time()] * n, pa.float64()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        target = self.uri(name)
        tmp = join(self.root, name, f".tmp-{uuid.uuid4().hex}.parquet")
        self.storage.write_bytes(tmp, buf.getvalue())
        self.storage.move(tmp, target)
        return Gallery(gallery.identities, gallery.embeddings, gallery.sources, gallery.identity_net_sha256,
                       self.stamp(name))
