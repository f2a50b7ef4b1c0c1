"""A replica's galleries: one ``serving.index.GalleryIndex`` per name, read from the append-only store of
``ipsr_platform.gallery`` and kept current by a background thread every ``gallery_refresh_s`` (only the segments added
since are read), so that an identify waits on storage for one listing of the tombstones only. The store's failures
become one-line HTTP answers.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator

import torch
from fastapi import HTTPException

from ipsr_platform.config import ServeConfig
from ipsr_platform.gallery import GalleryStore, UnreadableSegment, WeightsMismatch
from ipsr_platform.storage import StorageError
from serving.edge import check_gallery_name
from serving.index import GalleryIndex, return_freed_memory

log = logging.getLogger("ipsr.serve")


@contextlib.contextmanager
def store_errors(name: str) -> Iterator[None]:
    """The gallery store's failures as one-line HTTP answers instead of a bare 500."""
    try:
        yield
    except WeightsMismatch as err:
        raise HTTPException(409, f"gallery {name!r}: {err}") from None
    except StorageError as err:  # unreachable after the storage retries: worth trying again later
        raise HTTPException(503, f"gallery {name!r}: {err}") from None
    except UnreadableSegment as err:
        raise HTTPException(500, f"gallery {name!r}: {err}") from None


class GalleryCache:
    """The indexes by gallery name; ``lock``: one load or update at a time (they would read the same files)."""

    def __init__(self, store: GalleryStore, cfg: ServeConfig, device: torch.device, identity_net_sha256: str):
        self.store = store
        self.cfg = cfg
        self.device = device
        self.identity_net_sha256 = identity_net_sha256  # the replica's FaceNet: galleries of another are refused
        self.indexes: dict[str, GalleryIndex] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        if cfg.gallery_refresh_s > 0:
            threading.Thread(target=self._watch, name="ipsr-gallery-refresh", daemon=True).start()

    def get(self, name: str, fresh: bool = False) -> GalleryIndex | None:
        """The gallery as this replica holds it (kept current by `_watch`), 400 for a name no gallery can have.
        A tombstone not applied yet (a person deleted through another replica) is applied first: one listing of the
        tombstones per call, so that nobody is returned after their delete was answered. ``fresh`` looks at the
        whole store now (after this replica's own write, or before answering what a gallery holds)."""
        check_gallery_name(name)
        cached = self.indexes.get(name)
        if cached and not fresh and self.cfg.gallery_refresh_s > 0:
            with store_errors(name):
                if self.store.tombstones(name) == cached.gallery.stamp[1]:
                    return cached
        with store_errors(name), self.lock:
            return self._update(name)

    def forget(self, name: str) -> None:
        """Drop a deleted gallery's index."""
        self.indexes.pop(name, None)

    def comparable(self, name: str, index: GalleryIndex | None) -> None:
        """409 when the gallery's embeddings come from another FaceNet than this replica's: not comparable."""
        sha = index.gallery.identity_net_sha256 if index is not None else ""
        if sha and sha != self.identity_net_sha256:
            raise HTTPException(
                409,
                f"gallery {name!r} was enrolled with identity net {sha[:12]}…, this service "
                f"embeds with {self.identity_net_sha256[:12]}…: scores would be meaningless; "
                "enrol into a new gallery (or serve with the gallery's weights)",
            )

    def _update(self, name: str) -> GalleryIndex | None:
        """Bring the cached index up to date: append only what was enrolled since (the common case), else reload."""
        cached = self.indexes.get(name)
        delta = self.store.added_since(name, cached.gallery) if cached else None
        if delta is not None:
            if delta.stamp != cached.gallery.stamp:
                self.indexes[name] = cached = cached.extended(delta)
            return cached
        gallery = self.store.load(name)
        if gallery is None:
            self.indexes.pop(name, None)
            return None
        index = GalleryIndex.build(gallery, self.device, self.cfg.gallery_dtype)
        del gallery
        self.indexes[name] = index  # the previous index, if any, is freed here
        del cached
        return_freed_memory()
        # A million-row gallery is millions of long-lived objects; the cyclic GC would re-scan them all at every
        # full collection, a pause in the middle of someone's request. They live until the next reload anyway.
        gc.freeze()
        return index

    def _watch(self) -> None:
        """Every ``gallery_refresh_s``: pick up what other replicas enrolled or removed, off the request path."""
        while not self._stop.wait(self.cfg.gallery_refresh_s):
            for name in list(self.indexes):
                try:
                    with self.lock:
                        self._update(name)
                except Exception:  # noqa: BLE001 - storage briefly unreachable, or a mismatch: next round
                    log.exception("gallery %r refresh failed; still serving what was read before", name)

    def stop(self) -> None:
        self._stop.set()
