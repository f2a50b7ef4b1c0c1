"""The HTTP edge of ``ipsr serve``: the FastAPI app, bearer-token auth and the body cap (an ASGI guard that runs
before any route, so a refused request costs no parsing), and upload parsing (multipart or JSON/base64) into
``Upload``s. No routes (``serving.ingress``), no model, no gallery (``serving.app``).
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations at runtime.
import base64
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from ipsr_model.errors import UserError
from ipsr_platform.config import ServeConfig
from ipsr_platform.faces import Rejected
from ipsr_platform.gallery import check_name

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
        service = serve.get_replica_context().servable_object  # the ingress: its tokens and limits
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = dict(scope["headers"])
        if path not in PUBLIC_PATHS and not authorised(headers.get(b"authorization", b""), service.tokens.current()):
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


@api.exception_handler(RequestValidationError)
async def _one_line_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI answers a bad query value with a JSON list of every failed check; ipsr's errors are one line."""
    errors = err.errors()
    first = errors[0] if errors else {}
    where = " ".join(str(part) for part in first.get("loc", ("request",)))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _error(422, f"{where}: {first.get('msg', 'invalid')}{more}")


def authorised(header: bytes, token_sha256s: tuple[str, ...] | None) -> bool:
    """Whether an Authorization header carries a bearer token whose sha256 is one of ``token_sha256s`` (None: no
    auth). Every accepted hash is compared, in constant time each: which one matched, if any, takes no less time."""
    if token_sha256s is None:  # --insecure-no-auth
        return True
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    matched = False
    for accepted in token_sha256s:
        matched |= hmac.compare_digest(digest, accepted)
    return matched


def parse_tokens(text: str, where: str) -> tuple[str, ...]:
    """The sha256s of the tokens in ``text``: one per line or comma-separated (current + next during a rollover);
    blank lines and ``#`` comments ignored. Each token ≥ 16 characters."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    tokens = [t.strip() for line in lines for t in line.split(",") if t.strip()]
    if short := [t for t in tokens if len(t) < 16]:
        raise UserError(f"{where}: {len(short)} bearer token(s) shorter than 16 characters")
    return tuple(dict.fromkeys(hashlib.sha256(t.encode()).hexdigest() for t in tokens))


def token_sha256(cfg: ServeConfig) -> tuple[str, ...] | None:
    """sha256s of the accepted bearer tokens (from --token-file or $IPSR_SERVE_TOKEN): only hashes reach the
    replicas and the Serve config; None only with --insecure-no-auth."""
    if cfg.token_file:
        try:
            text, where = open(os.path.expanduser(cfg.token_file), encoding="utf-8").read(), cfg.token_file
        except OSError as err:
            raise UserError(f"cannot read token file {cfg.token_file}: {err.strerror}") from None
    else:
        text, where = os.environ.get(TOKEN_ENV, ""), f"${TOKEN_ENV}"
    hashes = parse_tokens(text, where)
    if hashes:
        return hashes
    if cfg.insecure_no_auth:
        log.warning("serving WITHOUT authentication (--insecure-no-auth): local use only")
        return None
    raise UserError(
        f"no bearer token configured: set ${TOKEN_ENV} or --token-file (or --insecure-no-auth for local use only)"
    )


class Tokens:
    """A replica's accepted token hashes. With a token file, the file is checked every ``refresh_s`` and re-read
    when it changed: a rollover (add the new token, move clients, remove the old one) needs no restart. A file
    the replica can't read, or one left with no token, keeps the last good set (logged)."""

    def __init__(self, hashes: tuple[str, ...] | None, token_file: str | None, refresh_s: float = 5.0):
        self.hashes, self.refresh_s = hashes, refresh_s
        self.path = os.path.expanduser(token_file) if token_file and hashes is not None else None
        self._checked, self._stamp = time.monotonic(), self._file_stamp()

    def _file_stamp(self) -> tuple | None:
        try:
            info = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino) if info else None

    def current(self) -> tuple[str, ...] | None:
        if self.path and time.monotonic() - self._checked >= self.refresh_s:
            self._checked = time.monotonic()
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                try:
                    hashes = parse_tokens(open(self.path, encoding="utf-8").read(), self.path)
                    if not hashes:
                        raise UserError(f"{self.path}: no token")
                    self.hashes = hashes
                    log.info("token file %s re-read: %d token(s) accepted", self.path, len(hashes))
                except (OSError, UserError) as err:
                    log.error("token file %s not used (%s); the previous tokens stay valid", self.path, err)
        return self.hashes


def check_gallery_name(name: str) -> None:
    """400 for a name no gallery can have (it names a folder), before any store access."""
    try:
        check_name(name)
    except UserError as err:
        raise HTTPException(400, str(err)) from None


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
