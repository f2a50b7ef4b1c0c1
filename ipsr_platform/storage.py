"""Local paths and ``s3://`` URIs behind one small interface, with retries.

Everything goes through ``pyarrow.fs`` so the same code reads a laptop folder, AWS S3 or an S3-compatible store
(MinIO, Ceph, moto). A ``Storage`` is picklable: the driver builds it once from its environment and ships it to
Ray workers with the endpoint and region, never with credentials: each process gets those from where the node
keeps them (AWS_* variables from a Kubernetes Secret, an instance role / IRSA, ~/.aws), read by the AWS SDK
itself, so no secret sits in a task's or actor's arguments (which Ray records and shows).

Failures that can heal (network, throttling, 5xx) are retried with exponential backoff and jitter; after the
last attempt a ``StorageError`` names the operation and the object. Missing objects and permission errors are
not retried: waiting does not fix them.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ipsr_model.errors import UserError

T = TypeVar("T")

# Errors retrying cannot fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class StorageError(UserError):
    """A storage operation failed for good; the message names the object."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. ``endpoint_url`` points at an S3-compatible store instead of AWS."""

    endpoint_url: str | None = None
    region: str | None = None
    # Only for keys given in code (never read from the environment: the SDK's default chain reads AWS_* in each
    # process). Kept out of repr so they never reach a log, and out of pickles so they never reach Ray.
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> S3Options:
        env = os.environ
        endpoint = env.get("IPSR_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if endpoint and not region:
            region = "us-east-1"  # S3-compatible stores ignore it, but the SDK must not go looking for one.
        return cls(endpoint_url=endpoint or None, region=region)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        attempts = int(os.environ.get("IPSR_STORAGE_RETRIES", cls.attempts))
        delay = float(os.environ.get("IPSR_STORAGE_RETRY_DELAY_S", cls.base_delay_s))
        return cls(attempts=max(1, attempts), base_delay_s=max(0.0, delay))

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff: many workers retrying at once don't hit the store in lockstep."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with '/', for local paths and s3:// alike."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def normalize(uri: str) -> str:
    """Absolute local path, or the s3:// URI without a trailing slash."""
    if is_s3(uri):
        return uri.rstrip("/")
    uri = uri.removeprefix("file://")
    if "://" in uri:
        raise UserError(f"unsupported storage scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


class Storage:
    """Read, write, list and move objects under local paths or s3:// URIs."""

    def __init__(self, s3: S3Options | None = None, retry: RetryPolicy | None = None):
        self.s3 = s3 or S3Options()
        self.retry = retry or RetryPolicy()
        self._fs: dict[str, pafs.FileSystem] = {}

    @classmethod
    def from_env(cls) -> Storage:
        return cls(S3Options.from_env(), RetryPolicy.from_env())

    # Filesystem clients hold sockets and threads: rebuild them in each process instead of pickling them.
    # Explicit keys stay behind too: a pickle becomes a Ray task argument, which the cluster records.
    def __getstate__(self) -> dict:
        return {"s3": replace(self.s3, access_key=None, secret_key=None, session_token=None), "retry": self.retry}

    def __setstate__(self, state: dict) -> None:
        Storage.__init__(self, state["s3"], state["retry"])

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and the path inside it (``bucket/key`` for S3)."""
        uri = normalize(uri)
        kind = "s3" if is_s3(uri) else "local"
        if kind not in self._fs:
            self._fs[kind] = self._make_s3() if kind == "s3" else pafs.LocalFileSystem()
        return self._fs[kind], uri.removeprefix("s3://")

    def _make_s3(self) -> pafs.FileSystem:
        o = self.s3
        kwargs: dict = dict(
            region=o.region,
            connect_timeout=5,
            request_timeout=60,
            # Retries happen in one place, here, so the total wait stays bounded and predictable.
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        if o.access_key and o.secret_key:
            kwargs.update(access_key=o.access_key, secret_key=o.secret_key, session_token=o.session_token)
        if o.endpoint_url:
            parsed = urlparse(o.endpoint_url if "://" in o.endpoint_url else f"https://{o.endpoint_url}")
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        return pafs.S3FileSystem(**kwargs)

    def call(self, what: str, uri: str, fn: Callable[[pafs.FileSystem, str], T]) -> T:
        """Run ``fn(fs, path)`` with retries; ``what`` (e.g. 'read') and ``uri`` go into the error message."""
        fs, path = self.resolve(uri)
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                return fn(fs, path)
            except _PERMANENT as err:
                raise StorageError(f"{what} {uri}: {_short(err)}") from err
            except OSError as err:  # pyarrow reports network and S3 service errors as OSError
                last = err
                if attempt + 1 < self.retry.attempts:
                    time.sleep(self.retry.delay(attempt))
        raise StorageError(f"{what} {uri} failed after {self.retry.attempts} attempts: {_short(last)}") from last

    # --- the operations the jobs need -------------------------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        def _read(fs: pafs.FileSystem, path: str) -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        return self.call("read", uri, _read)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """All or nothing for every reader: one PUT on S3; locally a hidden temporary file renamed into place (a
        reader listing or opening the file mid-write, e.g. another replica's gallery refresh, never sees half)."""

        def _write(fs: pafs.FileSystem, path: str) -> None:
            if is_s3(uri):
                with fs.open_output_stream(path) as f:
                    f.write(data)
                return
            parent, _, base = path.rpartition("/")
            if parent:
                fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{base}.{os.getpid()}-{random.getrandbits(32):08x}.tmp"
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                fs.move(tmp, path)  # rename(2): atomic on one filesystem
            except BaseException:
                if fs.get_file_info(tmp).type == pafs.FileType.File:
                    fs.delete_file(tmp)
                raise

        self.call("write", uri, _write)

    def info(self, uri: str) -> pafs.FileInfo:
        return self.call("stat", uri, lambda fs, path: fs.get_file_info(path))

    def exists(self, uri: str) -> bool:
        return self.info(uri).type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        return self.info(uri).type == pafs.FileType.Directory

    def list(self, uri: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Entries under ``uri``; ``FileInfo.path`` is turned back into a full URI."""
        prefix = "s3://" if is_s3(uri) else ""

        def _list(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
            return [pafs.FileInfo(prefix + i.path, i.type, size=i.size) for i in infos]

        return self.call("list", uri, _list)

    def delete(self, uri: str) -> None:
        """Delete a file or a whole directory/prefix; a missing one is fine."""

        def _delete(fs: pafs.FileSystem, path: str) -> None:
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                fs.delete_file(path)

        self.call("delete", uri, _delete)

    def move(self, src: str, dst: str) -> None:
        """Rename a file (a copy + delete on S3, which has no rename)."""
        dst_fs, dst_path = self.resolve(dst)

        def _move(fs: pafs.FileSystem, path: str) -> None:
            if not is_s3(dst):
                dst_fs.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)
            try:
                fs.move(path, dst_path)
            except FileNotFoundError:
                # A retried S3 move whose copy landed but whose delete failed: the object is already there.
                if dst_fs.get_file_info(dst_path).type != pafs.FileType.File:
                    raise

        self.call(f"move to {dst} from", src, _move)


def _short(err: BaseException | None) -> str:
    """First line of an error: pyarrow's S3 messages carry a multi-line SDK dump."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
