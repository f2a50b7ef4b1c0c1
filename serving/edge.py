"""The HTTP edge of ``ipsr serve``: the FastAPI app, bearer-token auth and the body cap (an ASGI guard that runs
before any route, so a refused request costs no parsing), and upload parsing (multipart or JSON/base64) into
``Upload``s. No model, no gallery: those are the deployment's (``serving.app``).
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at runtime.
import base64
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve

from ipsr_model.errors import UserError
from ipsr_platform.config import ServeConfig
from ipsr_platform.faces import Rejected

log = logging.getLogger("ipsr.serve")

TOKEN_ENV = "IPSR_SERVE_TOKEN"
PUBLIC_PATHS = {"/v1/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}

api = FastAPI(
    title="ipsr identification",
    description="Identity-preserving super-resolution (IPU-Net) + FaceNet identification. Bearer token on every "
    "route but /v1/healthz. Images: multipart field `image` (repeatable; enrolment also `identity`, one per "
    'image, same order) or JSON `{"images": [{"data": BASE64, "name": ..., "identity": ...}]}`.',
    version="1",
)


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Guard:
    """Auth and body cap before any route runs, so a refused request costs no parsing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = serve.get_replica_context().servable_object  # the deployment: its token hash and limits
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = dict(scope["headers"])
        if path not in PUBLIC_PATHS and not authorised(headers.get(b"authorization", b""), service.token_sha256):
            denied = _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return await denied(scope, receive, send)
        limit = service.cfg.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _error(400, "bad Content-Length")(scope, receive, send)
        if declared > limit:
            return await _error(413, f"request body larger than {limit} bytes")(scope, receive, send)
        received = 0

        async def capped():  # chunked bodies declare no length: count what actually arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge(limit)
            return message

        try:
            await self.app(scope, capped, send)
        except _TooLarge as err:
            await _error(413, err.detail)(scope, receive, send)


api.add_middleware(Guard)


def authorised(header: bytes, token_sha256: str | None) -> bool:
    """Whether an Authorization header carries the bearer token whose sha256 is ``token_sha256`` (None: no auth)."""
    if token_sha256 is None:  # --insecure-no-auth
        return True
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), token_sha256)


def token_sha256(cfg: ServeConfig) -> str | None:
    """sha256 of the bearer token (from --token-file or $IPSR_SERVE_TOKEN): only the hash reaches the replicas
    and the Serve config; None only with --insecure-no-auth."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if cfg.token_file:
        try:
            token = open(os.path.expanduser(cfg.token_file), encoding="utf-8").read().strip()
        except OSError as err:
            raise UserError(f"cannot read token file {cfg.token_file}: {err.strerror}") from None
    if token:
        if len(token) < 16:
            raise UserError("the bearer token must be at least 16 characters")
        return hashlib.sha256(token.encode()).hexdigest()
    if cfg.insecure_no_auth:
        log.warning("serving WITHOUT authentication (--insecure-no-auth): local use only")
        return None
    raise UserError(
        f"no bearer token configured: set ${TOKEN_ENV} or --token-file (or --insecure-no-auth for local use only)"
    )


@dataclass
class Upload:
    index: int
    name: str
    data: bytes | None
    identity: str | None = None
    error: Rejected | None = None
    image_id: str | None = None  # client-chosen: a retried enrolment of the same image is not stored twice


def within_bytes(upload: Upload, cfg: ServeConfig) -> bytes:
    """The upload's bytes; ``too_large`` past ``max_image_bytes`` (before anything is decoded)."""
    if len(upload.data) > cfg.max_image_bytes:
        raise Rejected("too_large", f"{len(upload.data)} bytes > max_image_bytes {cfg.max_image_bytes}")
    return upload.data


async def read_uploads(request: Request, cfg: ServeConfig, enrol: bool = False) -> list[Upload]:
    """Images from a multipart form (field ``image``) or JSON ``{"images": [{"data": base64, ...}]}``; an
    upload with a bad field carries its reason (``error``) instead of failing the request."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        uploads = await _form_uploads(request, cfg, enrol)
    elif ctype.startswith("application/json"):
        uploads = await _json_uploads(request, cfg)
    else:
        raise HTTPException(415, "send multipart/form-data (field 'image') or application/json")
    if not uploads:
        raise HTTPException(400, "no images in the request")
    for upload in uploads:
        named = isinstance(upload.identity, str) and 1 <= len(upload.identity.strip()) and len(upload.identity) <= 256
        if enrol and not upload.error and not named:
            upload.error = Rejected("bad_request", "every image needs an 'identity' (1-256 characters)")
        if upload.image_id is not None and not 1 <= len(upload.image_id) <= 256:
            upload.error = Rejected("bad_request", "'image_id' must be 1-256 characters")
    return uploads


async def _form_uploads(request: Request, cfg: ServeConfig, enrol: bool) -> list[Upload]:
    form = await request.form(max_files=cfg.max_images, max_fields=cfg.max_images + 16)
    files, names, image_ids = form.getlist("image"), form.getlist("identity"), form.getlist("image_id")
    if enrol and len(names) != len(files):
        raise HTTPException(400, f"{len(files)} images but {len(names)} identity fields: give one per image")
    if image_ids and len(image_ids) != len(files):
        raise HTTPException(400, f"{len(files)} images but {len(image_ids)} image_id fields: none or one per image")
    uploads = []
    for i, f in enumerate(files):
        if isinstance(f, str):
            raise HTTPException(400, "field 'image' must be a file upload")
        image_id = str(image_ids[i]) if image_ids else None
        identity = names[i] if enrol else None
        uploads.append(Upload(i, f.filename or f"image-{i}", await f.read(), identity, image_id=image_id))
    return uploads


async def _json_uploads(request: Request, cfg: ServeConfig) -> list[Upload]:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None
    items = body.get("images") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise HTTPException(400, 'JSON body must be {"images": [{"data": BASE64, ...}, ...]}')
    if len(items) > cfg.max_images:
        raise HTTPException(400, f"{len(items)} images > max_images {cfg.max_images} per request")
    uploads = []
    for i, item in enumerate(items):
        item = item if isinstance(item, dict) else {}
        image_id = None if item.get("image_id") is None else str(item["image_id"])
        upload = Upload(i, str(item.get("name") or f"image-{i}"), None, item.get("identity"), image_id=image_id)
        try:
            upload.data = base64.b64decode(str(item.get("data", "")), validate=True)
        except ValueError:  # binascii.Error is a ValueError
            upload.error = Rejected("bad_request", "'data' is not valid base64")
        uploads.append(upload)
    return uploads
