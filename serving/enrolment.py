"""Enrolment into a gallery: the request's byte and pixel budgets (from headers, nothing decoded), MTCNN alignment
(or a centre square for already aligned crops), FaceNet, the ``image_id`` repeat check, and one new segment in the
append-only store per request (no other write can erase it). Blocking: the deployment runs it in a thread.
"""

from __future__ import annotations

import logging

import torch
from fastapi import HTTPException
from torch import nn

from ipsr_model.identify import embed
from ipsr_model.images import to_tensor
from ipsr_platform.config import ServeConfig
from ipsr_platform.faces import FaceAligner, Rejected, enrolment_faces, open_header
from serving.edge import Upload, within_bytes
from serving.gallery_cache import GalleryCache, store_errors
from serving.index import GalleryIndex

log = logging.getLogger("ipsr.serve")

ALIGN_CHUNK = 8  # enrolment images decoded and aligned at a time


class Enrolment:
    """Uploads → embeddings → a segment of gallery ``name``; the aligner (MTCNN) is created on first use."""

    def __init__(self, cfg: ServeConfig, device: torch.device, identity_net: nn.Module, galleries: GalleryCache):
        self.cfg = cfg
        self.device = device
        self.identity_net = identity_net
        self.galleries = galleries
        self._aligner: FaceAligner | None = None

    def enrol(self, name: str, uploads: list[Upload], aligned: bool) -> dict:
        """The answer's body (the deployment adds its replica): 200 when something was ``enrolled`` or
        ``already_enrolled``, 400 otherwise. 409 when the gallery was embedded with another FaceNet."""
        index = self.galleries.get(name, fresh=True)
        self.galleries.comparable(name, index)
        repeated = self.repeated(uploads, index)
        good, embeddings = self.embed_faces([u for u in uploads if u.index not in repeated], aligned)
        if good:
            with store_errors(name):
                self.galleries.store.append(
                    name, [u.identity.strip() for u in good], embeddings.numpy(), [u.name for u in good],
                    [u.image_id for u in good], self.identity_net.weights_sha256,
                )  # fmt: skip
            try:
                index = self.galleries.get(name, fresh=True)
            except HTTPException as err:  # stored: answer it; this replica catches up at its next refresh
                log.warning("enrolled into %r, but reading it back failed: %s", name, err.detail)
        rejects = [
            {"index": u.index, "name": u.name, "reason": u.error.reason, "detail": u.error.detail}
            for u in uploads
            if u.error
        ]
        return {
            "gallery": name,
            "enrolled": len(good),
            "already_enrolled": len(repeated),
            "rejected": len(rejects),
            "gallery_size": len(index.gallery) if index else 0,
            "gallery_identities": len(index.names) if index else 0,
            "rejects": rejects,
            "identity_net_sha256": self.identity_net.weights_sha256,
        }

    @staticmethod
    def repeated(uploads: list[Upload], index: GalleryIndex | None) -> set[int]:
        """Upload indices whose image_id the gallery (or an earlier image of this request) already has."""
        held = index.gallery.image_id_set if index is not None else frozenset()
        repeated, earlier = set(), set()
        for upload in uploads:
            if upload.error is None and upload.image_id is not None:
                if upload.image_id in held or upload.image_id in earlier:
                    repeated.add(upload.index)
                earlier.add(upload.image_id)
        return repeated

    def within_budget(self, uploads: list[Upload]) -> list[Upload]:
        """The uploads to decode: each within the byte limit, all together within ``max_request_pixels`` declared
        pixels (read from headers, nothing decoded); the rest get a reason."""
        todo, pixels = [], 0
        for upload in (u for u in uploads if u.error is None):
            try:
                w, h = open_header(within_bytes(upload, self.cfg), self.cfg.max_image_pixels).size
                if pixels + w * h > self.cfg.max_request_pixels:
                    raise Rejected(
                        "too_large",
                        f"the request's images exceed max_request_pixels "
                        f"{self.cfg.max_request_pixels}: send fewer per request",
                    )
                pixels += w * h
                todo.append(upload)
            except Rejected as err:
                upload.error = err
        return todo

    def embed_faces(self, uploads: list[Upload], aligned: bool) -> tuple[list[Upload], torch.Tensor]:
        """Aligned 128×128 faces → unit embeddings. Streams ``ALIGN_CHUNK`` images at a time: a full-resolution
        decode lives only while its chunk is aligned (a request may carry 64 photos of 16 MP)."""
        good, faces = [], []
        todo = self.within_budget(uploads)
        for start in range(0, len(todo), ALIGN_CHUNK):
            chunk = todo[start : start + ALIGN_CHUNK]
            for upload, result in zip(chunk, self._faces(chunk, aligned)):
                if isinstance(result, Rejected):
                    upload.error = result
                else:
                    good.append(upload), faces.append(result)
        if not good:
            return [], torch.empty(0)
        batch = to_tensor(faces).to(self.device)
        with torch.inference_mode():
            embeddings = torch.cat([embed(self.identity_net, chunk) for chunk in batch.split(32)])
        return good, embeddings.cpu()

    def _faces(self, chunk: list[Upload], aligned: bool) -> list:
        """A 128×128 face (PIL) or the reason why not, per upload (faces.enrolment_faces); MTCNN loads on first use."""
        if not aligned and self._aligner is None:
            self._aligner = FaceAligner(self.cfg.device, max_pixels=self.cfg.max_image_pixels)
        aligner = None if aligned else self._aligner
        return enrolment_faces([u.data for u in chunk], aligner, self.cfg.max_image_pixels)
