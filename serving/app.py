"""``ipsr serve``: batch face identification on Ray Serve (FastAPI ingress, one deployment).

Request path (no pickle anywhere: bodies are JSON or multipart, images are decoded by Pillow after the same
signature / declared-size checks as ``ipsr preprocess``):

    Guard (ASGI)     bearer token (all routes but health and the docs), body cap → 401 / 413 before parsing
    route            parse images (``serving.edge``: the HTTP edge), validate each (400 with a reason per bad
                     image; good ones still answered)
    _infer           @serve.batch across concurrent requests: bicubic → U-Net SR → FaceNet embedding, then
                     cosine top-k against the gallery as one (chunked) matrix product per gallery and batch

Probes go through ``ipsr_model`` exactly as in training: a low-resolution crop (both sides ≤ ``lr_max_side``)
is bicubic-resized to 128×128 — the inverse of ``ipsr_model.degradation`` — and super-resolved; a larger
probe is an aligned face, centre-square-cropped to 128×128 (``square_face``) and embedded as is.

The generator comes from the MLflow registry (``models:/NAME@ALIAS`` by default ``ipsr-unet@champion``). A
background thread re-resolves the alias every ``model_poll_s`` and swaps in a new version; ``user_config``
(``serve deploy``) changes the model URI or batch size without a restart. Each batch reads the model once, so
a switch is atomic per batch and every result names the version that produced it. Galleries live in the
append-only store of ``serving.gallery``; each replica keeps them as ``serving.index.GalleryIndex``.
"""

# No `from __future__ import annotations`: Serve's class ingress hands FastAPI wrapped methods whose string
# annotations it cannot resolve, and `request: Request` would turn into a query parameter.
import asyncio
import contextlib
import gc
import base64
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from fastapi import HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from ray import serve

from ipsr_model.errors import UserError
from ipsr_model.identify import best_per_identity, embed
from ipsr_model.images import square_face, to_pil, to_tensor
from ipsr_model.unet import IMAGE_SIZE
from ipsr_platform.config import ServeConfig, build_config
from ipsr_platform.faces import FaceAligner, Rejected, decode, encode_png, open_header
from ipsr_platform.models import parse_model_uri
from ipsr_platform.storage import Storage, StorageError
from serving.edge import Upload, api, read_uploads, token_sha256
from serving.gallery import GalleryStore, UnreadableSegment, WeightsMismatch, check_name
from serving.index import GalleryIndex, return_freed_memory

log = logging.getLogger("ipsr.serve")

# Only these reasons make a request a 400: the client sent something that is not a usable image. A decoded
# image without a face is a normal enrolment outcome (like in `ipsr preprocess`), reported but not an error.
INVALID = {"corrupt", "too_large", "unsupported_format", "bad_request"}
# The deployment's user_config, as serve_config.yaml, infra/kuberay/rayservice.yaml and the README document it.
USER_CONFIG_KEYS = ("generator", "max_batch_size", "batch_wait_timeout_s")
ALIGN_CHUNK = 8  # enrolment images decoded and aligned at a time


@dataclass
class Probe:
    """One probe for `_infer`: a 128×128 face in [-1, 1] (bicubic-upscaled when it was low-resolution)."""

    image: torch.Tensor
    super_resolve: bool
    concat_bicubic: bool = False
    gallery: "GalleryIndex | None" = None
    top_k: int = 0
    want_image: bool = False


@dataclass
class Loaded:
    """A generator and where it came from; replaced as a whole, never mutated."""

    module: Any
    name: str
    version: str
    alias: str | None
    identity_net_sha256: str | None
    run_id: str | None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id,
                "identity_net_sha256": self.identity_net_sha256, "loaded_at": self.loaded_at}


@contextlib.contextmanager
def _store_errors(name: str):
    """The gallery store's failures as one-line HTTP answers instead of a bare 500. (Defined before the deployment:
    Serve pickles the class when it is decorated, with the module globals that exist at that point.)"""
    try:
        yield
    except WeightsMismatch as err:
        raise HTTPException(409, f"gallery {name!r}: {err}") from None
    except StorageError as err:  # unreachable after the storage retries: worth trying again later
        raise HTTPException(503, f"gallery {name!r}: {err}") from None
    except UnreadableSegment as err:
        raise HTTPException(500, f"gallery {name!r}: {err}") from None


@serve.deployment
@serve.ingress(api)
class Identification:
    def __init__(self, config: dict, token_sha256: str | None, tracking_uri: str, gallery_root: str,
                 storage: Storage):
        from ipsr_model.identity import IdentityNet

        self.cfg = ServeConfig(**config)
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.cpus_per_replica)))
        self.device = torch.device(self.cfg.device)
        self.token_sha256 = token_sha256
        self.tracking_uri = tracking_uri
        self.store = GalleryStore(gallery_root, storage)
        # channels_last: same arithmetic, ~20 % faster FaceNet convolutions and pooling on CPU (oneDNN).
        self.identity = IdentityNet(self.cfg.identity_weights).to(self.device, memory_format=torch.channels_last)
        self.model_uri = self.cfg.generator
        self.model: Loaded = self._load(self.model_uri)
        self.galleries: dict[str, GalleryIndex] = {}
        self.swap_lock = threading.Lock()
        self._aligner = None
        self.gallery_lock = threading.Lock()  # one load or update at a time (they would read the same files)
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="ipsr-model-poll", daemon=True).start()
        if self.cfg.gallery_refresh_s > 0:
            threading.Thread(target=self._watch_galleries, name="ipsr-gallery-refresh", daemon=True).start()

    # --- model ---------------------------------------------------------------------------------------------

    def _load(self, uri: str, version: str | None = None) -> Loaded:
        """Load ``uri``; ``version``: the version its alias was just resolved to (loaded as such: one registry
        lookup, and no race with an alias that moves in between)."""
        from ipsr_platform import tracking
        from ipsr_platform.models import load_generator

        name, alias, _ = parse_model_uri(uri)
        # pt2 (torch.export) only, unless --allow-pickle-models: unpickling runs code stored with the model.
        loaded = load_generator(f"models:/{name}/{version}" if version else uri, self.tracking_uri,
                                allow_pickle=self.cfg.allow_pickle_models)
        sha = loaded.tags.get(tracking.TAG_IDENTITY_NET)
        if sha and sha != self.identity.weights_sha256:
            log.warning("model %s/%s was trained against identity net %s…, serving with %s…", name, loaded.version,
                        sha[:12], self.identity.weights_sha256[:12])
        log.info("serving %s version %s", uri, loaded.version)
        return Loaded(loaded.module.to(self.device), name, str(loaded.version), alias, sha, loaded.run_id)

    def _poll(self) -> None:
        """Every ``model_poll_s``: resolve the alias again and swap in a new version (one attribute assignment:
        atomic per batch)."""
        from ipsr_platform import tracking

        while not self._stop.wait(self.cfg.model_poll_s):
            try:
                with self.swap_lock:
                    name, alias, _ = parse_model_uri(self.model_uri)
                    if alias:
                        current = str(tracking.version_for_alias(name, alias, self.tracking_uri).version)
                        if current != self.model.version or name != self.model.name:
                            self.model = self._load(self.model_uri, version=current)
            except Exception:  # noqa: BLE001 - the registry may be briefly unreachable: keep the current model
                log.exception("model refresh failed; still serving version %s", self.model.version)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` of the deployment (``USER_CONFIG_KEYS``; changeable without restarting replicas).

        ``generator`` pins a model URI; without it the deployment's configured generator is served again."""
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:  # a misspelt key would otherwise be ignored in silence
            raise ValueError(f"unknown user_config key(s) {unknown}; expected {list(USER_CONFIG_KEYS)}")
        if "max_batch_size" in user_config:
            self._infer.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._infer.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        uri = user_config.get("generator") or self.cfg.generator
        if uri != self.model_uri:
            with self.swap_lock:
                self.model_uri = uri
                self.model = self._load(uri)

    def __del__(self):
        self._stop.set()

    # --- images ------------------------------------------------------------------------------------------------

    def _within_bytes(self, upload: Upload) -> bytes:
        if len(upload.data) > self.cfg.max_image_bytes:
            raise Rejected("too_large", f"{len(upload.data)} bytes > max_image_bytes {self.cfg.max_image_bytes}")
        return upload.data

    def _probe(self, upload: Upload, super_resolve: str, **fields) -> Probe:
        """The upload's 128×128 face, super-resolved when low-resolution ("auto") or asked to ("true"); ``fields``:
        the rest of the `Probe`."""
        img = decode(self._within_bytes(upload), self.cfg.max_image_pixels)
        low = max(img.size) <= self.cfg.lr_max_side
        # A low-resolution crop is a whole face at a fraction of 128², possibly non-square (16x12): stretch it
        # back, as the degradation's bicubic up does. An HR probe keeps its aspect: centre square crop.
        face = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC) if low else square_face(img)
        return Probe(to_tensor(face)[0], low if super_resolve == "auto" else super_resolve == "true", **fields)

    # --- galleries ---------------------------------------------------------------------------------------------

    def _gallery(self, name: str, fresh: bool = False) -> GalleryIndex | None:
        """The cached gallery (kept current by `_watch_galleries`), 400 for a name no gallery can have; ``fresh``
        looks at the store now (after this replica's own write, or before answering what a gallery holds). Identify
        never waits on a listing."""
        self._check_name(name)
        cached = self.galleries.get(name)
        if cached and not fresh and self.cfg.gallery_refresh_s > 0:
            return cached
        with _store_errors(name), self.gallery_lock:
            return self._update_gallery(name)

    def _update_gallery(self, name: str) -> GalleryIndex | None:
        """Bring the cached index up to date: append only what was enrolled since (the common case), else reload."""
        cached = self.galleries.get(name)
        delta = self.store.added_since(name, cached.gallery) if cached else None
        if delta is not None:
            if delta.stamp != cached.gallery.stamp:
                self.galleries[name] = cached = cached.extended(delta)
            return cached
        gallery = self.store.load(name)
        if gallery is None:
            self.galleries.pop(name, None)
            return None
        index = GalleryIndex.build(gallery, self.device, self.cfg.gallery_dtype)
        del gallery
        self.galleries[name] = index  # the previous index, if any, is freed here
        del cached
        return_freed_memory()
        # A million-row gallery is millions of long-lived objects; the cyclic GC would re-scan them all at every
        # full collection, a pause in the middle of someone's request. They live until the next reload anyway.
        gc.freeze()
        return index

    def _watch_galleries(self) -> None:
        """Every ``gallery_refresh_s``: pick up what other replicas enrolled or removed, off the request path."""
        while not self._stop.wait(self.cfg.gallery_refresh_s):
            for name in list(self.galleries):
                try:
                    with self.gallery_lock:
                        self._update_gallery(name)
                except Exception:  # noqa: BLE001 - storage briefly unreachable, or a mismatch: next round
                    log.exception("gallery %r refresh failed; still serving what was read before", name)

    def _comparable(self, name: str, index: GalleryIndex | None) -> None:
        """409 when the gallery's embeddings come from another FaceNet than this replica's: not comparable."""
        sha = index.gallery.identity_net_sha256 if index is not None else ""
        if sha and sha != self.identity.weights_sha256:
            raise HTTPException(409, f"gallery {name!r} was enrolled with identity net {sha[:12]}…, this service "
                                     f"embeds with {self.identity.weights_sha256[:12]}…: scores would be meaningless; "
                                     "enrol into a new gallery (or serve with the gallery's weights)")

    def _within_budget(self, uploads: list[Upload]) -> list[Upload]:
        """The uploads to decode: each within the byte limit, all together within ``max_request_pixels`` declared
        pixels (read from headers, nothing decoded); the rest get a reason."""
        todo, pixels = [], 0
        for upload in (u for u in uploads if u.error is None):
            try:
                w, h = open_header(self._within_bytes(upload), self.cfg.max_image_pixels).size
                if pixels + w * h > self.cfg.max_request_pixels:
                    raise Rejected("too_large", f"the request's images exceed max_request_pixels "
                                                f"{self.cfg.max_request_pixels}: send fewer per request")
                pixels += w * h
                todo.append(upload)
            except Rejected as err:
                upload.error = err
        return todo

    def _enrol_faces(self, uploads: list[Upload], aligned: bool) -> tuple[list[Upload], torch.Tensor]:
        """Aligned 128×128 faces → unit embeddings. Streams ``ALIGN_CHUNK`` images at a time: a full-resolution
        decode lives only while its chunk is aligned (a request may carry 64 photos of 16 MP)."""
        if not aligned and self._aligner is None:
            self._aligner = FaceAligner(self.cfg.device, max_pixels=self.cfg.max_image_pixels)
        good, faces = [], []
        todo = self._within_budget(uploads)
        for start in range(0, len(todo), ALIGN_CHUNK):
            chunk = todo[start : start + ALIGN_CHUNK]
            if aligned:
                results = []
                for upload in chunk:
                    try:
                        results.append(square_face(decode(upload.data, self.cfg.max_image_pixels)))
                    except Rejected as err:
                        results.append(err)
            else:
                results = [r if isinstance(r, Rejected) else r.face for r in self._aligner.align([u.data for u in chunk])]
            for upload, result in zip(chunk, results):
                if isinstance(result, Rejected):
                    upload.error = result
                else:
                    good.append(upload), faces.append(result)
        if not good:
            return [], torch.empty(0)
        batch = to_tensor(faces).to(self.device)
        with torch.inference_mode():
            embeddings = torch.cat([embed(self.identity, chunk) for chunk in batch.split(32)])
        return good, embeddings.cpu()

    # --- the batched model path --------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer(self, probes: list[Probe]) -> list[dict]:
        model = self.model  # read once: an alias switch never splits a batch
        return await asyncio.to_thread(self._compute, model, probes)

    def _compute(self, model: Loaded, probes: list[Probe]) -> list[dict]:
        with torch.inference_mode():
            bicubic = torch.stack([p.image for p in probes]).to(self.device)
            faces = bicubic.clone()
            sr_rows = [i for i, p in enumerate(probes) if p.super_resolve]
            if sr_rows:
                faces[sr_rows] = model.module(bicubic[sr_rows]).to(faces.dtype)
            out = [{"super_resolved": p.super_resolve, "model_version": model.version} for p in probes]
            for i, p in enumerate(probes):
                if p.want_image:
                    out[i]["image"] = faces[i : i + 1]
            wanted = [i for i, p in enumerate(probes) if p.gallery is not None]
            if not wanted:
                return out
            embeddings = embed(self.identity, faces[wanted])
            concat = [j for j, i in enumerate(wanted) if probes[i].concat_bicubic and probes[i].super_resolve]
            bicubic_embeddings = embed(self.identity, bicubic[[wanted[j] for j in concat]]) if concat else None
            groups: dict[int, list[int]] = {}
            for j, i in enumerate(wanted):
                groups.setdefault(id(probes[i].gallery), []).append(j)
            for rows in groups.values():
                index = probes[wanted[rows[0]]].gallery
                both = [(r, concat.index(j)) for r, j in enumerate(rows) if j in concat]
                best = best_per_identity(
                    embeddings[rows], index.embeddings, index.codes, len(index.names), chunk=self.cfg.gallery_chunk,
                    also=bicubic_embeddings[[b for _, b in both]] if both else None, also_rows=[r for r, _ in both],
                )
                k = max(probes[wanted[j]].top_k for j in rows)
                scores, ids = best.topk(min(k, best.shape[1]), dim=1)
                for r, j in enumerate(rows):
                    kk = probes[wanted[j]].top_k
                    out[wanted[j]]["matches"] = [
                        {"rank": rank + 1, "identity": index.names[c], "score": round(float(s), 6)}
                        for rank, (s, c) in enumerate(zip(scores[r, :kk].tolist(), ids[r, :kk].tolist()))
                    ]
            return out

    # --- routes ------------------------------------------------------------------------------------------------

    @api.get("/v1/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.model.version}

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        info = self.model.describe()
        return {**info, "uri": self.model_uri, "serving_identity_net_sha256": self.identity.weights_sha256,
                "replica": serve.get_replica_context().replica_tag}

    @api.post("/v1/galleries/{name}/enroll")
    async def enroll(self, name: str, request: Request, aligned: bool = Query(
        False, description="Images are already aligned face crops: skip MTCNN (centre square → 128×128).")):
        """HR images + identities (+ optional image_id) → aligned, embedded, appended to gallery `name`.

        Answered 200 once what was enrolled is stored (one new segment: no other write can erase it), with a reason
        per image that was not; 400 only when nothing in the request was usable. An image whose ``image_id`` the
        gallery already holds is ``already_enrolled``, not stored again: retrying a request is safe."""
        self._check_name(name)
        uploads = await read_uploads(request, self.cfg, enrol=True)
        index = await asyncio.to_thread(self._gallery, name, True)
        self._comparable(name, index)
        repeated = self._repeated(uploads, index)
        todo = [u for u in uploads if u.index not in repeated]
        good, embeddings = await asyncio.to_thread(self._enrol_faces, todo, aligned)
        if good:
            with _store_errors(name):
                await asyncio.to_thread(
                    self.store.append, name, [u.identity.strip() for u in good], embeddings.numpy(),
                    [u.name for u in good], [u.image_id for u in good], self.identity.weights_sha256,
                )  # fmt: skip
            try:
                index = await asyncio.to_thread(self._gallery, name, True)
            except HTTPException as err:  # stored: answer it; this replica catches up at its next refresh
                log.warning("enrolled into %r, but reading it back failed: %s", name, err.detail)
        rejects = [{"index": u.index, "name": u.name, "reason": u.error.reason, "detail": u.error.detail}
                   for u in uploads if u.error]
        body = {"gallery": name, "enrolled": len(good), "already_enrolled": len(repeated), "rejected": len(rejects),
                "gallery_size": len(index.gallery) if index else 0,
                "gallery_identities": len(index.names) if index else 0, "rejects": rejects,
                "identity_net_sha256": self.identity.weights_sha256,
                "replica": serve.get_replica_context().replica_tag}
        return JSONResponse(body, status_code=200 if good or repeated else 400)

    @staticmethod
    def _repeated(uploads: list[Upload], index: GalleryIndex | None) -> set[int]:
        """Upload indices whose image_id the gallery (or an earlier image of this request) already has."""
        held = index.gallery.image_id_set if index is not None else frozenset()
        repeated, earlier = set(), set()
        for upload in uploads:
            if upload.error is None and upload.image_id is not None:
                if upload.image_id in held or upload.image_id in earlier:
                    repeated.add(upload.index)
                earlier.add(upload.image_id)
        return repeated

    @api.get("/v1/galleries/{name}")
    async def gallery_info(self, name: str, offset: int = Query(0, ge=0), limit: int = Query(
            100, ge=0, le=10_000, description="Identities listed (sorted by name), with their face counts.")) -> dict:
        """Size, identities and the identity network's sha256 of gallery `name`, and a page of its identities."""
        index = await asyncio.to_thread(self._gallery, name, True)
        if index is None:
            raise HTTPException(404, f"gallery {name!r} not found")
        counts = np.bincount(index.codes.cpu().numpy(), minlength=len(index.names))
        by_name = np.argsort(np.asarray(index.names, dtype=object), kind="stable")[offset : offset + limit]
        return {"gallery": name, "size": len(index.gallery), "identities": len(index.names),
                "identity_net_sha256": index.gallery.identity_net_sha256,
                "page": [{"identity": index.names[i], "faces": int(counts[i])} for i in by_name]}

    @api.delete("/v1/galleries/{name}")
    async def gallery_delete(self, name: str) -> dict:
        """Delete gallery `name` with everything enrolled in it."""
        if await asyncio.to_thread(self._gallery, name, True) is None:
            raise HTTPException(404, f"gallery {name!r} not found")
        with _store_errors(name):
            await asyncio.to_thread(self.store.delete, name)
        self.galleries.pop(name, None)
        return {"gallery": name, "deleted": True}

    @api.delete("/v1/galleries/{name}/identities/{identity}")
    async def identity_delete(self, name: str, identity: str) -> dict:
        """Remove one person from gallery `name`: every face enrolled for `identity` so far."""
        index = await asyncio.to_thread(self._gallery, name, True)
        rows = int((index.gallery.identities == identity).sum()) if index is not None else 0
        if not rows:
            raise HTTPException(404, f"identity {identity!r} is not in gallery {name!r}")
        with _store_errors(name):
            await asyncio.to_thread(self.store.delete_identity, name, identity)
        await asyncio.to_thread(self._gallery, name, True)
        return {"gallery": name, "identity": identity, "removed_faces": rows}

    @api.post("/v1/galleries/{name}/identify")
    async def identify(
        self, name: str, request: Request,
        top_k: int | None = Query(None, ge=1, le=1000, description="Matches per probe (default from config)."),
        super_resolve: Literal["auto", "true", "false"] = Query(
            "auto", description="auto: only low-resolution probes (both sides ≤ lr_max_side) are super-resolved."),
        concat_bicubic: bool = Query(False, description="Embed [bicubic ; SR] (the paper's SCface setting)."),
        return_image: bool = Query(False, description="Include the 128×128 face that was embedded (PNG, base64)."),
    ):  # fmt: skip
        """Probes → (bicubic → U-Net SR →) FaceNet → cosine top-k identities of gallery `name`."""
        index = await asyncio.to_thread(self._gallery, name)
        if index is None or not index.names:
            raise HTTPException(404, f"gallery {name!r} not found (enrol into it first)")
        self._comparable(name, index)
        uploads = await read_uploads(request, self.cfg)
        results = await self._run(uploads, super_resolve, concat_bicubic=concat_bicubic, gallery=index,
                                  top_k=top_k or self.cfg.top_k, want_image=return_image)
        return self._respond({"gallery": name, "model": self.model.describe(), "results": results})

    @api.post("/v1/superresolve")
    async def superresolve(self, request: Request):
        """Probe(s) → SR faces: one probe → image/png; several → JSON with base64 PNGs."""
        results = await self._run(await read_uploads(request, self.cfg), "true", want_image=True)
        if len(results) == 1 and "image" in results[0]:
            return Response(base64.b64decode(results[0]["image"]), media_type="image/png",
                            headers={"X-Model-Version": results[0]["model_version"]})
        return self._respond({"model": self.model.describe(), "results": results})

    async def _run(self, uploads: list[Upload], super_resolve: str, **fields) -> list[dict]:
        """Prepare every upload (`_probe`; bad ones get a reason), run the good ones through the batch, keep order."""

        def prepare():
            probes = {}
            for upload in (u for u in uploads if u.error is None):
                try:
                    probes[upload.index] = self._probe(upload, super_resolve, **fields)
                except Rejected as err:
                    upload.error = err
            return probes

        probes = await asyncio.to_thread(prepare)
        answers = await asyncio.gather(*(self._infer(p) for p in probes.values()))
        done = dict(zip(probes, answers))
        results = []
        for upload in uploads:
            entry: dict[str, Any] = {"index": upload.index, "name": upload.name}
            if upload.error:
                entry["error"] = {"reason": upload.error.reason, "detail": upload.error.detail}
            else:
                answer = done[upload.index]
                if "image" in answer:
                    answer["image"] = base64.b64encode(encode_png(to_pil(answer["image"])[0])).decode()
                entry.update(answer)
            results.append(entry)
        return results

    @staticmethod
    def _respond(body: dict) -> JSONResponse:
        bad = any(r.get("error", {}).get("reason") in INVALID for r in body["results"])
        return JSONResponse(body, status_code=400 if bad else 200)

    @staticmethod
    def _check_name(name: str) -> None:
        try:
            check_name(name)
        except UserError as err:
            raise HTTPException(400, str(err)) from None


# --- building the application --------------------------------------------------------------------------------


def replica_resources(cfg: ServeConfig) -> dict[str, Any]:
    """Ray resources of one replica: a whole GPU with --device cuda unless a share is given (CUDA without a
    reservation would share a GPU Ray does not know is in use)."""
    gpus = {"num_gpus": cfg.gpus_per_replica or 1} if cfg.device == "cuda" else {}
    return {"num_cpus": cfg.cpus_per_replica, **gpus}


def build_app(cfg: ServeConfig, name: str = "Identification", user_config: dict | None = None):
    """The Serve application for ``cfg``; tracking URI, gallery root and S3 settings are resolved here, in the
    process that deploys, and shipped to the replicas (whose environment may differ). ``user_config`` replaces the
    deployment's (what a serve_config.yaml ``user_config`` block does)."""
    from ipsr_model.weights import ipsr_home
    from ipsr_platform import tracking

    sha = token_sha256(cfg)
    gallery_root = cfg.galleries or str(ipsr_home() / "galleries")
    deployment = Identification.options(
        name=name,
        # Only when asked for: a fixed count would clash with an autoscaling_config from serve_config.yaml.
        **({"num_replicas": cfg.num_replicas} if cfg.num_replicas > 1 else {}),
        ray_actor_options=replica_resources(cfg),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        user_config=user_config if user_config is not None else {"max_batch_size": cfg.max_batch_size,
                                                                 "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    )
    return deployment.bind(cfg.model_dump(), sha, tracking.tracking_uri(), gallery_root, Storage.from_env())


def app_builder(args: dict):
    """``serve run serving.app:app_builder key=value`` / ``import_path`` in serve_config.yaml: ServeConfig
    fields from ``args`` (< no YAML here; ``IPSR_SERVE_*`` env is read first, args win)."""
    cfg = build_config(ServeConfig, env_prefix="IPSR_SERVE_", **(args or {}))
    return build_app(cfg)


def deploy(cfg: ServeConfig, echo=print) -> str:
    """Deploy on the connected Ray (a local one by default) and return the base URL, e.g. http://127.0.0.1:8000."""
    from ipsr_model.weights import _classify, fetch_identity_weights
    from ipsr_platform import cluster, tracking

    token_sha256(cfg)  # no token and no --insecure-no-auth: fail before starting anything
    name, alias, version = parse_model_uri(cfg.generator)
    if alias:  # a missing model is a user mistake: say so here, not in a replica's traceback
        tracking.version_for_alias(name, alias)
    if _classify(cfg.identity_weights) != "path":  # fetch once here; replicas on this machine read the file
        cfg = cfg.model_copy(update={"identity_weights": str(fetch_identity_weights(cfg.identity_weights))})
    cluster.connect()
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name="ipsr", route_prefix="/")
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown}:{cfg.port}"
    echo(f"ipsr serving {cfg.generator} at {url}/v1 (docs: {url}/docs)")
    return url


def wait_until_stopped() -> None:
    """Block until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1.0)


def undeploy() -> None:
    serve.shutdown()


def serve_forever(cfg: ServeConfig, echo=print) -> None:
    """``ipsr serve``: deploy, print the URL, block until Ctrl-C, shut Serve down."""
    deploy(cfg, echo)
    echo("Ctrl-C stops")
    try:
        wait_until_stopped()
    finally:
        undeploy()
