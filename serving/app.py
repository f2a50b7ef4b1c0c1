"""``ipsr serve``: batch face identification on Ray Serve, two deployments.

``serving.ingress.Ingress`` takes the HTTP requests (auth, body cap, upload parsing) and asks the model deployment
here, ``Identification``, retrying on another replica when one dies with the request. ``Identification`` keeps the
batch (``@serve.batch`` across concurrent requests into ``ipsr_model.identify.identify_batch``: bicubic → U-Net SR →
back-projection → FaceNet → cosine top-k per gallery) and the glue; each other concern has its module:
``serving.edge`` (no pickle from clients, images decoded by Pillow after the same checks as ``ipsr preprocess``),
``serving.model_slot`` (the generator from the MLflow registry, hot-swapped), ``serving.gallery_cache`` (galleries,
refreshed in the background) and ``serving.enrolment``. A low-resolution probe (both sides ≤ ``lr_max_side``) is
bicubic-resized to 128×128 — the inverse of ``ipsr_model.degradation`` — super-resolved, then back-projected toward
the probe (``back_projection`` steps); a larger one is embedded as is.
"""

import asyncio
import base64
import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from ray import serve

from ipsr_model.identify import Probe, identify_batch
from ipsr_model.images import to_pil
from ipsr_platform import tracking
from ipsr_platform.config import ServeConfig, build_config
from ipsr_platform.faces import Rejected, decode, encode_png, make_probe, probe_face
from ipsr_platform.gallery import GalleryStore
from ipsr_platform.models import parse_model_uri
from ipsr_platform.storage import Storage
from serving.edge import Upload, token_sha256, within_bytes
from serving.enrolment import Enrolment
from serving.gallery_cache import GalleryCache, store_errors
from serving.ingress import Ingress
from serving.model_slot import ModelSlot

# Only these reasons make a request a 400: the client sent something that is not a usable image. A decoded
# image without a face is a normal enrolment outcome (like in `ipsr preprocess`), reported but not an error.
INVALID = {"corrupt", "too_large", "unsupported_format", "bad_request"}
# The deployment's user_config, as serve_config.yaml, infra/kuberay/rayservice.yaml and the README document it.
USER_CONFIG_KEYS = ("generator", "max_batch_size", "batch_wait_timeout_s")


def probe(upload: Upload, cfg: ServeConfig, super_resolve: str, **fields) -> Probe:
    """The upload's 128×128 face, super-resolved when low-resolution ("auto") or asked to ("true"); ``fields``:
    the rest of the `Probe`."""
    face, lr = probe_face(decode(within_bytes(upload, cfg), cfg.max_image_pixels), cfg.lr_max_side)
    return make_probe(face, lr, super_resolve, cfg.back_projection, **fields)


Answer = tuple[int, dict]  # (HTTP status, JSON body): what a model replica answers the ingress


def answers(method: Callable[..., Awaitable[Answer]]) -> Callable[..., Awaitable[Answer]]:
    """A refusal (HTTPException) becomes an answer: a replica's traceback would be noise for a client's mistake."""

    @functools.wraps(method)
    async def answering(*args, **kwargs) -> Answer:
        try:
            return await method(*args, **kwargs)
        except HTTPException as err:
            return err.status_code, {"detail": err.detail}

    return answering


@serve.deployment
class Identification:
    """The model replica: generator, FaceNet, galleries; the ingress (``serving.ingress``) parses the HTTP requests
    and asks it by method."""

    def __init__(self, config: dict, tracking_uri: str, gallery_root: str, storage: Storage):
        from ipsr_model.identity import IdentityNet

        self.cfg = ServeConfig(**config)
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.cpus_per_replica)))
        self.device = torch.device(self.cfg.device)
        # channels_last: same arithmetic, ~20 % faster FaceNet convolutions and pooling on CPU (oneDNN).
        self.identity_net = IdentityNet(self.cfg.identity_weights).to(self.device, memory_format=torch.channels_last)
        sha = self.identity_net.weights_sha256
        self.model_slot = ModelSlot(self.cfg, self.device, tracking_uri, sha)
        self.galleries = GalleryCache(GalleryStore(gallery_root, storage), self.cfg, self.device, sha)
        self.enrolment = Enrolment(self.cfg, self.device, self.identity_net, self.galleries)

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
        self.model_slot.pin(user_config.get("generator"))

    def __del__(self):
        self.model_slot.stop()
        self.galleries.stop()

    # --- the batched model path --------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer(self, probes: list[Probe]) -> list[dict]:
        loaded = self.model_slot.current  # read once: an alias switch never splits a batch
        answers = await asyncio.to_thread(
            identify_batch, loaded.module, self.identity_net, probes, self.device, self.cfg.gallery_chunk
        )
        return [{"super_resolved": a["super_resolved"], "model_version": loaded.version, **a} for a in answers]

    async def _run(self, uploads: list[Upload], super_resolve: str, **fields) -> list[dict]:
        """Prepare every upload (`probe`; bad ones get a reason), run the good ones through the batch, keep order."""

        def prepare():
            probes = {}
            for upload in (u for u in uploads if u.error is None):
                try:
                    probes[upload.index] = probe(upload, self.cfg, super_resolve, **fields)
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
    def _respond(body: dict) -> Answer:
        bad = any(r.get("error", {}).get("reason") in INVALID for r in body["results"])
        return 400 if bad else 200, body

    # --- what the ingress asks (serving.ingress): (status, body) answers, refusals included ------------------

    async def healthz(self) -> Answer:
        return 200, {"status": "ok", "model_version": self.model_slot.current.version}

    async def model_info(self) -> Answer:
        info = self.model_slot.current.describe()
        return 200, {
            **info,
            "uri": self.model_slot.uri,
            "serving_identity_net_sha256": self.identity_net.weights_sha256,
            "replica": serve.get_replica_context().replica_tag,
        }

    @answers
    async def enroll(self, name: str, uploads: list[Upload], aligned: bool) -> Answer:
        """HR uploads + identities (+ optional image_id) → aligned, embedded, appended to gallery `name`.

        200 once what was enrolled is stored (one new segment: no other write can erase it), with a reason per
        image that was not; 400 only when nothing in the request was usable. An image whose ``image_id`` the
        gallery already holds is ``already_enrolled``, not stored again: retrying a request is safe."""
        body = await asyncio.to_thread(self.enrolment.enrol, name, uploads, aligned)
        body["replica"] = serve.get_replica_context().replica_tag
        return 200 if body["enrolled"] or body["already_enrolled"] else 400, body

    @answers
    async def gallery_info(self, name: str, offset: int, limit: int) -> Answer:
        """Size, identities and the identity network's sha256 of gallery `name`, and a page of its identities."""
        index = await asyncio.to_thread(self.galleries.get, name, True)
        if index is None:
            raise HTTPException(404, f"gallery {name!r} not found")
        counts = np.bincount(index.codes.cpu().numpy(), minlength=len(index.names))
        by_name = np.argsort(np.asarray(index.names, dtype=object), kind="stable")[offset : offset + limit]
        return 200, {
            "gallery": name,
            "size": len(index.gallery),
            "identities": len(index.names),
            "identity_net_sha256": index.gallery.identity_net_sha256,
            "page": [{"identity": index.names[i], "faces": int(counts[i])} for i in by_name],
        }

    @answers
    async def gallery_delete(self, name: str) -> Answer:
        if await asyncio.to_thread(self.galleries.get, name, True) is None:
            raise HTTPException(404, f"gallery {name!r} not found")
        with store_errors(name):
            await asyncio.to_thread(self.galleries.store.delete, name)
        self.galleries.forget(name)
        return 200, {"gallery": name, "deleted": True}

    @answers
    async def identity_delete(self, name: str, identity: str) -> Answer:
        index = await asyncio.to_thread(self.galleries.get, name, True)
        rows = int((index.gallery.identities == identity).sum()) if index is not None else 0
        if not rows:
            raise HTTPException(404, f"identity {identity!r} is not in gallery {name!r}")
        with store_errors(name):
            await asyncio.to_thread(self.galleries.store.delete_identity, name, identity)
        await asyncio.to_thread(self.galleries.get, name, True)
        return 200, {"gallery": name, "identity": identity, "removed_faces": rows}

    @answers
    async def identify(self, name: str, uploads: list[Upload], options: dict) -> Answer:
        """Probes → (bicubic → U-Net SR →) FaceNet → cosine top-k identities of gallery `name`; ``options``:
        super_resolve, concat_bicubic, top_k, return_image (the query of POST /identify)."""
        index = await asyncio.to_thread(self.galleries.get, name)
        if index is None or not index.names:
            raise HTTPException(404, f"gallery {name!r} not found (enrol into it first)")
        self.galleries.comparable(name, index)
        results = await self._run(
            uploads,
            options["super_resolve"],
            concat_bicubic=options["concat_bicubic"],
            gallery=index,
            top_k=options["top_k"] or self.cfg.top_k,
            want_image=options["return_image"],
        )
        return self._respond({"gallery": name, "model": self.model_slot.current.describe(), "results": results})

    @answers
    async def superresolve(self, uploads: list[Upload]) -> Answer:
        """Probe(s) → SR faces (base64 PNGs; the ingress answers one probe as image/png)."""
        results = await self._run(uploads, "true", want_image=True)
        return self._respond({"model": self.model_slot.current.describe(), "results": results})


# --- building the application --------------------------------------------------------------------------------


def replica_resources(cfg: ServeConfig) -> dict[str, Any]:
    """Ray resources of one replica: a whole GPU with --device cuda unless a share is given (CUDA without a
    reservation would share a GPU Ray does not know is in use)."""
    gpus = {"num_gpus": cfg.gpus_per_replica or 1} if cfg.device == "cuda" else {}
    return {"num_cpus": cfg.cpus_per_replica, **gpus}


def build_app(cfg: ServeConfig, name: str = "Identification", user_config: dict | None = None):
    """The Serve application for ``cfg``: the ``Ingress`` in front of the model deployment ``name``. Tracking URI,
    gallery root and S3 settings are resolved here, in the process that deploys, and shipped to the replicas
    (whose environment may differ). ``user_config`` replaces the model deployment's (what a serve_config.yaml
    ``user_config`` block does)."""
    from ipsr_model.paths import galleries_dir

    sha = token_sha256(cfg)
    if cfg.token_file:  # the ingress re-reads it, from its own working directory
        cfg = cfg.model_copy(update={"token_file": os.path.abspath(os.path.expanduser(cfg.token_file))})
    gallery_root = cfg.galleries or str(galleries_dir())
    # Only when asked for: a fixed count would clash with an autoscaling_config from serve_config.yaml.
    replicas = {"num_replicas": cfg.num_replicas} if cfg.num_replicas > 1 else {}
    model = Identification.options(
        name=name,
        **replicas,
        ray_actor_options=replica_resources(cfg),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,  # per ingress replica; beyond it the ingress answers 503
        graceful_shutdown_timeout_s=cfg.drain_s,  # a stopping replica finishes its requests for this long
        user_config=user_config
        if user_config is not None
        else {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    ).bind(cfg.model_dump(), tracking.tracking_uri(), gallery_root, Storage.from_env())
    ingress = Ingress.options(
        **replicas,
        ray_actor_options={"num_cpus": 0},  # it parses and waits; the model replicas hold the CPUs
        # Room for every request the model replicas take or queue: the back-pressure is theirs (503).
        max_ongoing_requests=cfg.num_replicas * cfg.max_ongoing_requests + cfg.max_queued_requests + 8,
        graceful_shutdown_timeout_s=cfg.drain_s,
    )
    return ingress.bind(cfg.model_dump(), sha, model)


def app_builder(args: dict):
    """``serve run serving.app:app_builder key=value`` / ``import_path`` in serve_config.yaml: ServeConfig
    fields from ``args`` (< no YAML here; ``IPSR_SERVE_*`` env is read first, args win)."""
    cfg = build_config(ServeConfig, env_prefix="IPSR_SERVE_", **(args or {}))
    return build_app(cfg)


class StopSignals:
    """SIGTERM (what `docker stop`, systemd and Kubernetes send) and SIGINT (Ctrl-C) as a Python event.

    Python's handlers replace Ray's (installed by ray.init), which die on SIGTERM with a native stack dump.
    ``catch(SIGTERM)`` right after Ray starts keeps a stop sent while the app still deploys (a loaded suite sent one
    after the health check answered but before ``serve.run`` returned); ``wait`` adds SIGINT, blocks until a signal
    came and ignores the rest: the drain that follows is bounded by ``drain_s`` anyway."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.event = threading.Event()

    def catch(self, *signals: signal.Signals) -> None:
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.got.append(signum)
        self.event.set()

    def wait(self) -> str:
        """Block until SIGTERM or SIGINT; the first one's name."""
        self.catch(signal.SIGTERM, signal.SIGINT)
        while not self.event.wait(1.0):
            pass
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        return signal.Signals(self.got[0]).name


def deploy(cfg: ServeConfig, echo=print, stops: StopSignals | None = None) -> str:
    """Deploy on the connected Ray (a local one by default) and return the base URL, e.g. http://127.0.0.1:8000;
    ``stops`` catches SIGTERM from the moment Ray is up."""
    from ipsr_model.weights import classify_source, fetch_identity_weights
    from ipsr_platform import cluster, tracking

    token_sha256(cfg)  # no token and no --insecure-no-auth: fail before starting anything
    name, alias, version = parse_model_uri(cfg.generator)
    if alias:  # a missing model is a user mistake: say so here, not in a replica's traceback
        tracking.version_for_alias(name, alias)
    if classify_source(cfg.identity_weights) != "path":  # fetch once here; replicas on this machine read the file
        cfg = cfg.model_copy(update={"identity_weights": str(fetch_identity_weights(cfg.identity_weights))})
    cluster.connect()
    if stops is not None:  # ray.init installed Ray's handlers: SIGTERM is ours from here, before the slow deploy
        stops.catch(signal.SIGTERM)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name="ipsr", route_prefix="/")
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown}:{cfg.port}"
    echo(f"ipsr serving {cfg.generator} at {url}/v1 (docs: {url}/docs)")
    return url


def wait_until_stopped() -> str:
    """Block until SIGTERM or SIGINT; the signal's name."""
    return StopSignals().wait()


def undeploy() -> None:
    serve.shutdown()


def drain() -> float:
    """Stop taking requests and let in-flight ones finish (each replica up to ``drain_s``, Serve's graceful
    shutdown), then shut Serve down; the seconds it took."""
    began = time.monotonic()
    with contextlib.suppress(Exception):  # already gone (a cluster-side delete): nothing left to drain
        serve.delete("ipsr")
    serve.shutdown()
    return time.monotonic() - began


def serve_forever(cfg: ServeConfig, echo=print) -> None:
    """``ipsr serve``: deploy, print the URL, block until SIGTERM or Ctrl-C, drain, exit 0 with one line."""
    stops = StopSignals()
    deploy(cfg, echo, stops)
    echo(f"Ctrl-C or SIGTERM stops (in-flight requests get {cfg.drain_s:g} s to finish)")
    try:
        name = stops.wait()
    except BaseException:
        undeploy()
        raise
    echo(f"ipsr serve stopped on {name}: requests drained, Serve shut down in {drain():.1f} s")
