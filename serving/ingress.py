"""The HTTP routes of ``ipsr serve``: a thin deployment in front of the model replicas (``serving.app``).

It authenticates, caps and parses each request (``serving.edge``) and asks a model replica through a deployment
handle. A replica that dies with a request in flight (``ray.kill``, OOM, a lost node) would make Serve's proxy answer
500 (ray#47219); here the request is sent again, to a live replica, when resending cannot do it twice: reads,
identify, super-resolve, and enrolments whose every image carries an ``image_id``. Deletes and enrolments without
``image_id`` get a 503 saying the request may have been carried out.
"""

# No `from __future__ import annotations`: Serve's class ingress hands FastAPI wrapped methods whose string
# annotations it cannot resolve, and `request: Request` would turn into a query parameter.
import asyncio
import base64
import logging
from typing import Literal

from fastapi import HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ipsr_platform.config import ServeConfig
from serving.edge import Tokens, api, check_gallery_name, read_uploads

log = logging.getLogger("ipsr.serve")

RETRIES = 3  # a resend waits 0.1, 0.2, 0.4 s: Serve's router drops a dead replica within that
LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)  # ActorDiedError, ActorUnavailableError


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, token_sha256s: tuple[str, ...] | None, model: DeploymentHandle):
        self.cfg = ServeConfig(**config)  # (it and `tokens` are what `serving.edge.Guard` reads)
        self.tokens = Tokens(token_sha256s, self.cfg.token_file)
        self.model = model

    async def ask(self, method: str, *args, resend: bool = True) -> tuple[int, dict]:
        """A model replica's (status, body) for ``method(*args)``; resent on a lost replica when ``resend``."""
        for attempt in range(RETRIES + 1):
            try:
                return await getattr(self.model, method).remote(*args)
            except BackPressureError:
                raise HTTPException(503, "overloaded: too many requests queued, retry later") from None
            except LOST as err:
                if not resend:
                    raise HTTPException(
                        503, "the replica serving this request was lost; it may have been carried out"
                    ) from None
                lost = type(err).__name__
            if attempt < RETRIES:
                log.warning("%s: replica lost (%s), resending", method, lost)
                await asyncio.sleep(0.1 * 2**attempt)
        raise HTTPException(503, f"no model replica answered: {lost}")

    async def reply(self, method: str, *args, resend: bool = True) -> JSONResponse:
        status, body = await self.ask(method, *args, resend=resend)
        return JSONResponse(body, status_code=status)

    @api.get("/v1/healthz")
    async def healthz(self):
        return await self.reply("healthz")

    @api.get("/v1/model")
    async def model_info(self):
        return await self.reply("model_info")

    @api.post("/v1/galleries/{name}/enroll")
    async def enroll(
        self,
        name: str,
        request: Request,
        aligned: bool = Query(
            False, description="Images are already aligned face crops: skip MTCNN (centre square → 128×128)."
        ),
    ):
        """HR images + identities (+ optional image_id) → aligned, embedded, appended to gallery `name`.

        Answered 200 once what was enrolled is stored, with a reason per image that was not; 400 only when nothing
        in the request was usable. An image whose ``image_id`` the gallery already holds is ``already_enrolled``,
        not stored again: retrying a request is safe (and the service resends it itself on a lost replica)."""
        check_gallery_name(name)  # before the body is read or a replica asked
        uploads = await read_uploads(request, self.cfg, enrol=True)
        repeatable = all(u.image_id is not None for u in uploads if u.error is None)
        return await self.reply("enroll", name, uploads, aligned, resend=repeatable)

    @api.get("/v1/galleries/{name}")
    async def gallery_info(
        self,
        name: str,
        offset: int = Query(0, ge=0),
        limit: int = Query(
            100, ge=0, le=10_000, description="Identities listed (sorted by name), with their face counts."
        ),
    ):
        """Size, identities and the identity network's sha256 of gallery `name`, and a page of its identities."""
        check_gallery_name(name)
        return await self.reply("gallery_info", name, offset, limit)

    @api.delete("/v1/galleries/{name}")
    async def gallery_delete(self, name: str):
        """Delete gallery `name` with everything enrolled in it."""
        check_gallery_name(name)
        return await self.reply("gallery_delete", name, resend=False)

    @api.delete("/v1/galleries/{name}/identities/{identity}")
    async def identity_delete(self, name: str, identity: str):
        """Remove one person from gallery `name`: every face enrolled for `identity` so far."""
        check_gallery_name(name)
        return await self.reply("identity_delete", name, identity, resend=False)

    @api.post("/v1/galleries/{name}/identify")
    async def identify(
        self, name: str, request: Request,
        top_k: int | None = Query(None, ge=1, le=1000, description="Matches per probe (default from config)."),
        super_resolve: Literal["auto", "true", "false"] = Query(
            "auto", description="auto: only low-resolution probes (both sides ≤ lr_max_side) are super-resolved."),
        concat_bicubic: bool = Query(False, description="Embed [bicubic ; SR] (the paper's SCface setting)."),
        return_image: bool = Query(False, description="Include the 128×128 face that was embedded (PNG, base64)."),
    ):  # fmt: skip
        """Probes → (bicubic → U-Net SR → back-projection →) FaceNet → cosine top-k identities of gallery `name`."""
        check_gallery_name(name)
        uploads = await read_uploads(request, self.cfg)
        options = {"top_k": top_k, "super_resolve": super_resolve, "concat_bicubic": concat_bicubic,
                   "return_image": return_image}  # fmt: skip
        return await self.reply("identify", name, uploads, options)

    @api.post("/v1/superresolve")
    async def superresolve(self, request: Request):
        """Probe(s) → SR faces: one probe → image/png; several → JSON with base64 PNGs."""
        status, body = await self.ask("superresolve", await read_uploads(request, self.cfg))
        results = body.get("results", [])
        if status == 200 and len(results) == 1 and "image" in results[0]:
            return Response(
                base64.b64decode(results[0]["image"]),
                media_type="image/png",
                headers={"X-Model-Version": results[0]["model_version"]},
            )
        return JSONResponse(body, status_code=status)
