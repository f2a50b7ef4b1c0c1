"""Shared fixtures. Real data lives in ../shared/data (read-only, never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared(path: str) -> Path:
    full = SHARED_DATA / path
    if not full.exists():
        pytest.skip(f"real face data not found at {full} (the ../shared folder beside the checkout; CI has it)")
    return full


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first: pytest-xdist hands whole files to its two workers in this order
    (pyproject's addopts, `--no-loadscope-reorder`), so the long files start early and the quick ones fill the gaps
    at the end — the longest-first rule of scheduling. Within a file the order is kept."""
    weight: dict[Path, int] = {}
    for item in items:
        weight[item.path] = weight.get(item.path, 0) + (60 if item.get_closest_marker("slow") else 1)
    items.sort(key=lambda item: -weight[item.path])  # stable: ties and each file's tests keep their order


@pytest.fixture(scope="session")
def att_faces() -> Path:
    """ORL / AT&T faces: s1..s40, 10 grey 92x112 PGMs each."""
    return _shared("att_faces")


@pytest.fixture(scope="session")
def facenet_test_images() -> Path:
    """Four large colour portraits, one person each."""
    return _shared("facenet_test_images")


@pytest.fixture(scope="session")
def multiface_jpg() -> Path:
    """A group photo with several faces."""
    return _shared("multiface.jpg")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by the whole test session (a start costs ~6 s on 2 cores).

    RAY_AUTH_MODE is set explicitly: an unset mode makes a local ``ray.init()`` enable token auth. The
    dashboard is on because Ray Train V2's placement-group cleaner queries the state API through it.
    """
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Both workers start Ray at once with the slowest files: the dashboard's module processes can miss Ray's 60 s.
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "210")
    # S3 credentials reach Ray's workers as on a real cluster: from the node's environment (here moto's test keys,
    # inherited by every worker process), never in task arguments. No instance-metadata lookups off 127.0.0.1.
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(name, value)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, object_store_memory=512 * 2**20, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API (moto) on 127.0.0.1, for the whole session; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """Points every S3 client (boto3, ipsr Storage / pyarrow) at the moto server; returns a boto3 client."""
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


# --- preprocess: a mixed input folder of real faces and generated bad inputs --------------------------------------


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1×1 grey PNG whose header claims width×height: a decompression bomb without the memory cost."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts at 16: width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # CRC over b"IHDR" + data
    return bytes(png)


@pytest.fixture(scope="session")
def bad_inputs(facenet_test_images) -> dict[str, tuple[bytes, str]]:
    """file name → (bytes, the reject reason the job must give it)."""
    import io

    import numpy as np
    from PIL import Image

    photo = (facenet_test_images / "paul_rudd" / "1.jpg").read_bytes()
    ico = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 150, 120)).save(ico, "ICO")
    ramp = np.linspace(0, 255, 200, dtype=np.uint8)
    gradient = io.BytesIO()
    Image.fromarray(np.stack([np.tile(ramp, (200, 1))] * 3, axis=-1)).save(gradient, "PNG")
    return {
        "zero.jpg": (b"", "corrupt"),
        "truncated.jpg": (photo[: len(photo) // 2], "corrupt"),
        "text.jpg": (b"this is a text file, not a photo\n", "unsupported_format"),
        "icon.jpg": (ico.getvalue(), "unsupported_format"),  # an image format ipsr does not take (GIF/TIFF it does)
        "bomb.png": (_png_with_declared_size(100_000, 100_000), "too_large"),  # past Pillow's own limit
        "big.png": (_png_with_declared_size(6000, 5000), "too_large"),  # under Pillow's limit, over ours (25 MP)
        "gradient.png": (gradient.getvalue(), "no_face"),
    }


@pytest.fixture(scope="session")
def preprocess_src(tmp_path_factory, att_faces, facenet_test_images, multiface_jpg, bad_inputs) -> Path:
    """Identity folders: 3 ORL people (PGM, plus WebP/BMP/PPM/PNG conversions), the 4 portraits (plus CMYK and
    RGBA variants), the group photo, and ``bad/`` with every kind of bad input. 19 faces + 7 rejects."""
    from PIL import Image

    root = tmp_path_factory.mktemp("preprocess-src")
    for person in ("s1", "s2"):
        (root / person).mkdir()
        for i in (1, 2, 3, 4):
            (root / person / f"{i}.pgm").write_bytes((att_faces / person / f"{i}.pgm").read_bytes())
    (root / "s3").mkdir()
    for i, ext in zip((1, 2, 3, 4), ("webp", "bmp", "ppm", "png")):
        img = Image.open(att_faces / "s3" / f"{i}.pgm")
        (img.convert("RGB") if ext == "ppm" else img).save(root / "s3" / f"{i}.{ext}")
    for person_dir in sorted(facenet_test_images.iterdir()):
        (root / person_dir.name).mkdir()
        (root / person_dir.name / "1.jpg").write_bytes((person_dir / "1.jpg").read_bytes())
    half = Image.open(facenet_test_images / "angelina_jolie" / "1.jpg").reduce(4)
    half.convert("CMYK").save(root / "angelina_jolie" / "2_cmyk.jpg")
    Image.open(facenet_test_images / "kate_siegel" / "1.jpg").reduce(4).convert("RGBA").save(
        root / "kate_siegel" / "2_rgba.png"
    )
    (root / "group").mkdir()
    (root / "group" / "multiface.jpg").write_bytes(multiface_jpg.read_bytes())
    (root / "bad").mkdir()
    for name, (data, _) in bad_inputs.items():
        (root / "bad" / name).write_bytes(data)
    return root


# --- a fresh $IPSR_HOME that still has the (large, slow to build) weight files ------------------------------------


@pytest.fixture(scope="session")
def cached_weights() -> list[Path]:
    """The FaceNet and SFace weight files in the real cache (fetched once; tests point fresh homes at them)."""
    from ipsr_model.sface import fetch_sface_weights
    from ipsr_model.weights import fetch_identity_weights

    files = [fetch_identity_weights("casia-webface-offline"), fetch_sface_weights()]
    return [p for f in files for p in (f, f.with_name(f.name + ".sha256"))]


@pytest.fixture
def home_with_weights(tmp_path, monkeypatch, cached_weights) -> Path:
    """A fresh $IPSR_HOME (embedded MLflow) whose weights cache links to the real files."""
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    for file in cached_weights:
        (home / "weights" / file.name).symlink_to(file)
    monkeypatch.setenv("IPSR_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home
