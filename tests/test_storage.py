"""Storage: local paths and s3:// through a real S3 API (moto on 127.0.0.1), retries, clear errors."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import pyarrow.fs as pafs
import pytest

from ipsr_model.errors import UserError
from ipsr_platform.storage import RetryPolicy, S3Options, Storage, StorageError, join, normalize

KEYS = dict(access_key="testing", secret_key="testing", region="us-east-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_round_trip(tmp_path):
    st = Storage()
    a = join(str(tmp_path), "deep", "er", "a.bin")
    st.write_bytes(a, b"hello")  # parents are created
    assert st.read_bytes(a) == b"hello"
    assert st.exists(a) and not st.is_dir(a) and st.is_dir(str(tmp_path / "deep"))
    listed = st.list(str(tmp_path / "deep"), recursive=True)
    assert [i.path for i in listed if i.type == pafs.FileType.File] == [a]
    b = join(str(tmp_path), "moved", "b.bin")
    st.move(a, b)
    assert not st.exists(a) and st.read_bytes(b) == b"hello"
    st.delete(str(tmp_path / "moved"))
    st.delete(str(tmp_path / "never-existed"))  # deleting nothing is fine
    assert not st.exists(b)


def test_a_local_write_is_whole_for_every_reader(tmp_path):
    """A reader polling the path while 16 MiB are written (each time anew: a replica's next segment) sees nothing
    or everything, never a prefix; no temporary file is left and only the written files are listed."""
    st, path = Storage(), str(tmp_path / "g" / "segment.parquet")
    data = bytes(range(256)) * (2**16)
    seen, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.add(len(st.read_bytes(path)))
            except UserError:
                seen.add(0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for i in range(5):
        st.write_bytes(path, data[i:])
    done.set()
    watcher.join(timeout=30)
    assert seen <= {0} | {len(data) - i for i in range(5)}, sorted(seen)
    assert [e.path for e in st.list(str(tmp_path / "g"))] == [path]


def test_missing_object_fails_at_once_naming_it(tmp_path):
    st = Storage(retry=RetryPolicy(attempts=5, base_delay_s=1.0))
    missing = str(tmp_path / "nope.jpg")
    t = time.perf_counter()
    with pytest.raises(StorageError, match="nope.jpg"):
        st.read_bytes(missing)
    assert time.perf_counter() - t < 0.5  # not retried: waiting does not create the file


def test_uri_handling():
    assert normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert normalize("file:///tmp/x") == "/tmp/x"
    assert join("s3://b/p/", "/x/", "y.png") == "s3://b/p/x/y.png"
    with pytest.raises(UserError, match="unsupported storage scheme"):
        normalize("gs://bucket/x")


def test_s3_options_from_env(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-endpoint:1")
    assert S3Options.from_env().endpoint_url == "http://aws-endpoint:1"
    monkeypatch.setenv("IPSR_S3_ENDPOINT_URL", "http://ipsr-endpoint:2")
    opts = S3Options.from_env()
    assert opts.endpoint_url == "http://ipsr-endpoint:2"  # ours wins over the SDK-wide one
    assert opts.region == "us-east-1"  # an S3-compatible endpoint gets a region so the SDK never goes looking
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit")
    assert "sekrit" not in repr(S3Options.from_env())


def test_no_credential_travels_in_a_pickle(s3, monkeypatch):
    """What Ray ships to tasks, actors and Train workers (a Storage, the pyarrow filesystem) holds no secret; the
    worker side still reaches S3 with the credentials of its own environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-ipsr-test-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ipsr-test-secret-value")
    s3.create_bucket(Bucket="no-secrets")
    storage = Storage.from_env()
    fs, _ = storage.resolve("s3://no-secrets/x")
    explicit = Storage(S3Options(endpoint_url="http://127.0.0.1:1", **KEYS))
    for obj in (storage, fs, explicit):
        blob = pickle.dumps(obj)
        assert b"ipsr-test-secret-value" not in blob and b"AKIA-ipsr-test-id" not in blob and b"testing" not in blob
    worker = pickle.loads(pickle.dumps(storage))
    worker.write_bytes("s3://no-secrets/k", b"ok")
    assert worker.read_bytes("s3://no-secrets/k") == b"ok"


def test_s3_round_trip_through_the_real_api(s3):
    s3.create_bucket(Bucket="storage-rt")
    st = Storage.from_env()
    st = pickle.loads(pickle.dumps(st))  # what a Ray worker receives
    uri = "s3://storage-rt/a/b/c.bin"
    st.write_bytes(uri, b"\x00payload")
    assert s3.get_object(Bucket="storage-rt", Key="a/b/c.bin")["Body"].read() == b"\x00payload"
    assert st.read_bytes(uri) == b"\x00payload"
    assert st.is_dir("s3://storage-rt/a") and st.exists(uri)
    assert [i.path for i in st.list("s3://storage-rt/a")] == ["s3://storage-rt/a/b"]
    assert [i.path for i in st.list("s3://storage-rt/a", recursive=True) if i.type == pafs.FileType.File] == [uri]
    st.move(uri, "s3://storage-rt/final/c.bin")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="storage-rt")["Contents"]}
    assert "final/c.bin" in keys and "a/b/c.bin" not in keys  # (pyarrow leaves an 'a/b/' directory marker)
    st.delete("s3://storage-rt/final")
    st.delete("s3://storage-rt/a")
    assert "Contents" not in s3.list_objects_v2(Bucket="storage-rt")


def test_s3_retries_until_the_endpoint_answers(s3):
    """The endpoint refuses connections for ~0.6 s, then comes up: the read retries through it."""
    from moto.server import ThreadedMotoServer

    s3.create_bucket(Bucket="storage-late")
    s3.put_object(Bucket="storage-late", Key="k.jpg", Body=b"late")
    port = _free_port()
    # A second moto server in this process serves the same in-memory buckets, on a port nobody listens on yet.
    late = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    timer = threading.Timer(0.6, late.start)
    timer.start()
    try:
        st = Storage(
            S3Options(endpoint_url=f"http://127.0.0.1:{port}", **KEYS),
            RetryPolicy(attempts=40, base_delay_s=0.1, max_delay_s=0.4),
        )
        t = time.perf_counter()
        assert st.read_bytes("s3://storage-late/k.jpg") == b"late"
        assert time.perf_counter() - t >= 0.5  # it did have to wait for the server
    finally:
        timer.join(timeout=5)
        late.stop()


def test_s3_unreachable_gives_a_clear_error_naming_the_object():
    st = Storage(
        S3Options(endpoint_url=f"http://127.0.0.1:{_free_port()}", **KEYS), RetryPolicy(attempts=3, base_delay_s=0.05)
    )
    t = time.perf_counter()
    with pytest.raises(StorageError) as err:
        st.read_bytes("s3://some-bucket/people/x.jpg")
    message = str(err.value)
    assert "s3://some-bucket/people/x.jpg" in message and "after 3 attempts" in message
    assert "\n" not in message  # one line for the CLI
    assert time.perf_counter() - t < 15
    assert isinstance(err.value, UserError)  # the CLI prints it as one line, exit 2
