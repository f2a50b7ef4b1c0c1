"""A replica's in-memory index of one gallery (``ipsr_platform.gallery`` is the store it is read from): the embeddings
as one matrix on the replica's device, identities as dense codes for the per-identity max, and spare rows so that
an enrolment appends without copying a million-face matrix.

Apart from the store so that the store (also used by ``ipsr gallery compact``) stays free of torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ipsr_platform.gallery import Gallery


@dataclass
class GalleryIndex:
    """A gallery on the replica's device, with identities as dense codes for the per-identity max."""

    gallery: Gallery
    embeddings: torch.Tensor  # [N, D]: the first N rows of `room`'s matrix
    codes: torch.Tensor  # [N] long, index into names
    names: list[str]  # sorted, then identities first enrolled after the load in their order of arrival
    code_of: dict[str, int]  # names → code; only ever added to, so indexes of one lineage share it
    room: tuple[torch.Tensor, torch.Tensor]  # matrix and codes with spare rows: an enrolment rarely copies them

    @classmethod
    def build(cls, gallery: Gallery, device: torch.device, dtype: str = "float16") -> GalleryIndex:
        names, codes = gallery.identity_codes()
        # Spare rows from the start (as `extended` grows it): the first enrolments after a load copy nothing.
        rows, dim = gallery.embeddings.shape
        matrix = torch.empty((rows + rows // 8, dim), dtype=getattr(torch, dtype), device=device)
        matrix[:rows] = torch.from_numpy(gallery.embeddings)
        room = (matrix, torch.empty(len(matrix), dtype=torch.long, device=device))
        room[1][:rows] = torch.from_numpy(codes)
        # The index keeps its matrix; the float32 rows it came from are dropped (at 1M faces: 2 GB).
        gallery = dataclasses.replace(gallery, embeddings=np.empty((0, dim), np.float32))
        return cls(gallery, matrix[:rows], room[1][:rows], names, {n: c for c, n in enumerate(names)}, room)

    def extended(self, delta: Gallery) -> GalleryIndex:
        """This index with the rows of ``delta`` (`GalleryStore.added_since`) appended: no re-read of the rest.

        New rows go into the spare rows past this index's end (an index in use by a batch reads only up to its
        own end), so a million-face matrix is copied once per ~N/8 enrolled faces, not once per enrolment."""
        names = self.names + [n for n in dict.fromkeys(delta.identities.tolist()) if n not in self.code_of]
        self.code_of.update(zip(names[len(self.names) :], range(len(self.names), len(names))))
        n, m = len(self.embeddings), len(delta)
        matrix, codes = self.room
        if n + m > len(matrix):  # (an empty gallery may have no width yet: the new rows give it)
            matrix = torch.empty(
                (n + max(m, n // 8), delta.embeddings.shape[1]), dtype=matrix.dtype, device=matrix.device
            )
            codes = torch.empty(len(matrix), dtype=torch.long, device=codes.device)
            if n:
                matrix[:n], codes[:n] = self.embeddings, self.codes
        matrix[n : n + m] = torch.tensor(delta.embeddings, dtype=matrix.dtype).to(matrix.device)
        codes[n : n + m] = torch.tensor([self.code_of[i] for i in delta.identities.tolist()], dtype=torch.long)
        old = self.gallery
        gallery = dataclasses.replace(
            old,
            identities=np.concatenate([old.identities, delta.identities]),
            sources=np.concatenate([old.sources, delta.sources]),
            image_ids=np.concatenate([old.image_ids, delta.image_ids]),
            identity_net_sha256=old.identity_net_sha256 or delta.identity_net_sha256,
            stamp=delta.stamp,
        )
        return GalleryIndex(gallery, matrix[: n + m], codes[: n + m], names, self.code_of, (matrix, codes))


def return_freed_memory() -> None:
    """Hand freed memory back to the OS (glibc's heap and Arrow's pool keep it otherwise): a gallery load's
    transient copies would stay in the replica's RSS."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
