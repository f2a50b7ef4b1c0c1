"""Public face datasets that ipsr can download by itself (for `ipsr quickstart` without `--data`).

LFW comes from the figshare mirror that scikit-learn uses (the UMass host is often down), verified against the
archive's sha256 before anything is extracted, cached under ``$IPSR_HOME/datasets/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ipsr_model.errors import UserError
from ipsr_model.paths import datasets_dir

LFW_URL = "https://ndownloader.figshare.com/files/5976018"  # lfw.tgz, 180,566,744 bytes
LFW_SHA256 = "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0"
TIMEOUT_S = 60  # per network read; a stalled download fails instead of hanging


def lfw() -> Path:
    """``DIR/<Person_Name>/<Person_Name>_NNNN.jpg`` of LFW (13,233 images, 5,749 people), downloaded once."""
    url = os.environ.get("IPSR_LFW_URL", LFW_URL)
    return fetch_archive(url, LFW_SHA256, datasets_dir() / "lfw", top="lfw")


def fetch_archive(url: str, sha256: str, dest: Path, *, top: str) -> Path:
    """Download the ``.tgz`` at ``url``, check its sha256, extract its folder ``top`` to ``dest``.

    ``dest`` appears only complete (extracted beside it, then renamed); a present ``dest`` is reused.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.tgz"
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(archive, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            raise UserError(
                f"cannot download {url} ({getattr(err, 'reason', err)}); without internet access pass "
                "--data DIR with your own identity folders (DIR/<identity>/<image>)"
            ) from None
        if digest.hexdigest() != sha256:
            raise UserError(
                f"{url} downloaded, but its sha256 is {digest.hexdigest()[:12]}…, not {sha256[:12]}…: refusing to "
                "use it (a proxy page or a changed file); pass --data DIR instead"
            )
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # "data": no absolute paths, links out of the tree, devices
        except tarfile.TarError as err:
            raise UserError(f"{url}: unusable archive ({err})") from None
        extracted = Path(tmp) / top
        if not extracted.is_dir():
            raise UserError(f"{url}: the archive has no {top}/ folder")
        if not dest.is_dir():  # another process may have finished the same download meanwhile
            shutil.move(str(extracted), dest)
    return dest
