"""Dataset download (LFW for `ipsr quickstart`): checksum, safe extraction, clear errors — served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading

import pytest

from ipsr_model.errors import UserError
from ipsr_platform.datasets import fetch_archive


def tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def serve_bytes():
    """Serves one payload at http://127.0.0.1:PORT/file; returns a function payload -> url."""
    servers = []

    def start(payload: bytes) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/file"

    yield start
    for server in servers:
        server.shutdown()


def test_verified_archive_is_extracted_once(serve_bytes, tmp_path, att_faces):
    face = (att_faces / "s1" / "1.pgm").read_bytes()
    payload = tgz({"lfw/Ada_Lovelace/Ada_Lovelace_0001.pgm": face, "lfw/Alan_Turing/Alan_Turing_0001.pgm": face})
    url = serve_bytes(payload)
    dest = fetch_archive(url, hashlib.sha256(payload).hexdigest(), tmp_path / "lfw", top="lfw")
    assert sorted(p.name for p in dest.iterdir()) == ["Ada_Lovelace", "Alan_Turing"]
    assert (dest / "Ada_Lovelace" / "Ada_Lovelace_0001.pgm").read_bytes() == face
    assert [p.name for p in tmp_path.iterdir()] == ["lfw"]  # no download leftovers
    # cached: a second call does not download (the url is now wrong and would fail)
    assert fetch_archive("http://127.0.0.1:9/none", "0" * 64, tmp_path / "lfw", top="lfw") == dest


def test_checksum_mismatch_is_refused_and_nothing_is_kept(serve_bytes, tmp_path):
    url = serve_bytes(tgz({"lfw/a/1.jpg": b"x"}))
    with pytest.raises(UserError, match="sha256.*--data"):
        fetch_archive(url, "0" * 64, tmp_path / "lfw", top="lfw")
    assert list(tmp_path.iterdir()) == []


def test_archive_escaping_its_folder_is_refused(serve_bytes, tmp_path):
    payload = tgz({"lfw/a/1.jpg": b"x", "../evil.txt": b"owned"})
    url = serve_bytes(payload)
    with pytest.raises(UserError, match="unusable archive"):
        fetch_archive(url, hashlib.sha256(payload).hexdigest(), tmp_path / "d" / "lfw", top="lfw")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "d" / "lfw").exists()


def test_offline_names_the_data_option(tmp_path):
    with pytest.raises(UserError, match="--data DIR"):
        fetch_archive("http://127.0.0.1:9/lfw.tgz", "0" * 64, tmp_path / "lfw", top="lfw")
