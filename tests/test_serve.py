"""`ipsr serve` against a real Ray Serve app on 127.0.0.1: real MLflow registry (SQLite), real FaceNet, a tiny
U-Net trained here for a few steps and registered as ipsr-unet@champion, real HTTP. Every wait is bounded.

ORL protocol: gallery = `1.pgm` of every subject (already aligned crops: enrolled with aligned=true), probes =
`2.pgm` (HR) or `2.pgm` degraded to 16x12 (a surveillance-sized crop).
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import io
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import free_port, ray_worker_pids, stop_process_group

requests = pytest.importorskip("requests")

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SUBJECTS = [f"s{i}" for i in range(1, 41)]
TRAIN_STEPS = 200
TIMEOUT = 120  # seconds per HTTP call: a CPU batch of 40 probes through FaceNet takes a few seconds
ROOT = Path(__file__).resolve().parents[1]
IPSR = str(Path(sys.executable).parent / "ipsr")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except requests.RequestException as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh $IPSR_HOME with embedded MLflow (SQLite); the FaceNet weights come from the usual cache."""
    from ipsr_model.weights import fetch_identity_weights

    facenet = str(fetch_identity_weights("casia-webface-offline"))
    home = tmp_path_factory.mktemp("serve-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPSR_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("IPSR_SERVE_TOKEN", TOKEN)
        yield {"home": home, "facenet": facenet}


@pytest.fixture(scope="module")
def orl(att_faces):
    """subject → (gallery 1.pgm bytes, HR probe: 2.pgm as a 128x128 PNG, 16x12 probe PNG bytes)."""
    from PIL import Image

    from ipsr_model.degradation import resize
    from ipsr_model.images import square_face, to_pil, to_tensor

    out = {}
    for subject in SUBJECTS:
        probe = Image.open(att_faces / subject / "2.pgm")
        # The degradation's down half (PIL-compatible antialiased bicubic) of the aligned 128x128 face.
        low = to_pil(resize(to_tensor(square_face(probe)), (16, 12)).clamp(-1, 1))[0]
        # HR probe: the aligned 128x128 face (anything smaller on every side counts as low-resolution).
        out[subject] = ((att_faces / subject / "1.pgm").read_bytes(), png(square_face(probe)), png(low))
    return out


def register_generator(generator, identity_sha: str, alias: str, fmt: str = "pt2") -> str:
    import mlflow
    from mlflow.models import infer_signature

    from ipsr_platform import tracking

    uri = tracking.tracking_uri()
    experiment = tracking.ensure_experiment("ipsr-serve-test", uri)
    example = torch.zeros(2, 3, 128, 128)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), generator(example).numpy())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(
            generator, name="generator", signature=signature, input_example=example.numpy(), serialization_format=fmt
        )
    return tracking.register(
        info.model_uri, "ipsr-unet", alias=alias, tags={tracking.TAG_IDENTITY_NET: identity_sha}, uri=uri
    )


@pytest.fixture(scope="module")
def champion(env, att_faces):
    """A width-8 U-Net trained on ORL images 3-10 (never a gallery or probe image) at 16x12.

    Pixel loss (L1) only: 200 steps take ~7 s on 2 cores and already beat bicubic at 16x12 by a wide margin
    (rank-1 ~0.78 vs 0.45), while the full identity-preserving loss needs minutes (FaceNet forward + backward
    per sample) to get there; that loss is what `ipsr train` and its tests exercise.
    """
    import torch.nn.functional as F
    from PIL import Image

    from ipsr_model.degradation import MultiScaleDegradation
    from ipsr_model.identity import IdentityNet
    from ipsr_model.images import square_face, to_tensor
    from ipsr_model.training import make_optimizer
    from ipsr_model.unet import UNetGenerator

    torch.manual_seed(0)
    faces = to_tensor([square_face(Image.open(att_faces / s / f"{i}.pgm")) for s in SUBJECTS for i in range(3, 11)])
    generator = UNetGenerator(8)
    optimizer = make_optimizer(generator, lr=2e-3)
    rng = torch.Generator().manual_seed(0)
    degradation = MultiScaleDegradation(((16, 12),))
    generator.train()
    for _ in range(TRAIN_STEPS):
        hr = faces[torch.randint(len(faces), (16,), generator=rng)]
        loss = F.l1_loss(generator(degradation(hr, rng)[0]), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    generator.eval()
    identity_sha = IdentityNet(env["facenet"]).weights_sha256
    version = register_generator(generator, identity_sha, "champion")
    return {"generator": generator, "version": version, "identity_sha": identity_sha}


@pytest.fixture(scope="module")
def server_config(env):
    from ipsr_platform.config import ServeConfig

    return ServeConfig(
        identity_weights=env["facenet"],
        max_batch_size=8,
        max_ongoing_requests=8,
        max_queued_requests=2,
        max_body_bytes=2 * 2**20,
        max_images=48,
        model_poll_s=1.0,
        gallery_refresh_s=0.5,
        gallery_chunk=16,  # 40 gallery rows: three chunks, so the chunked top-k merge is what every test exercises
    )


@pytest.fixture(scope="module")
def server(ray_session, server_config, champion):
    """The real app on 127.0.0.1:<free port>; small limits so that 413 / 503 are cheap to provoke."""
    from ray import serve

    from serving.app import build_app

    cfg = server_config
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.run(build_app(cfg), name="ipsr-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{base}/v1/healthz", timeout=5).status_code == 200, 60, "healthz")
    yield base
    serve.delete("ipsr-test")
    serve.shutdown()


@pytest.fixture(scope="module")
def gallery(server, orl):
    files = [("image", (f"{s}-1.pgm", orl[s][0], "image/x-portable-graymap")) for s in SUBJECTS]
    data = [("identity", s) for s in SUBJECTS]
    r = requests.post(
        f"{server}/v1/galleries/orl/enroll",
        params={"aligned": "true"},
        files=files,
        data=data,
        headers=AUTH,
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["enrolled"] == 40 and body["rejected"] == 0 and body["gallery_identities"] == 40, body
    return "orl"


def identify(server, name, probes: dict[str, bytes], **params):
    images = [{"name": s, "data": base64.b64encode(data).decode()} for s, data in probes.items()]
    return requests.post(
        f"{server}/v1/galleries/{name}/identify", params=params, json={"images": images}, headers=AUTH, timeout=TIMEOUT
    )


def rank1(body) -> float:
    return sum(r["matches"][0]["identity"] == r["name"] for r in body["results"]) / len(body["results"])


# ------------------------------------------------------------------------------------------------- tests


def test_auth_health_and_model(server, champion):
    assert requests.get(f"{server}/v1/healthz", timeout=10).status_code == 200  # health needs no token
    assert requests.get(f"{server}/v1/model", timeout=10).status_code == 401
    wrong = requests.get(f"{server}/v1/model", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert requests.post(f"{server}/v1/galleries/orl/identify", json={"images": []}, timeout=10).status_code == 401
    info = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()
    assert (info["name"], info["version"], info["alias"]) == ("ipsr-unet", champion["version"], "champion")
    assert info["identity_net_sha256"] == champion["identity_sha"] == info["serving_identity_net_sha256"]
    assert requests.get(f"{server}/docs", timeout=10).status_code == 200
    # A name no gallery can have (it names a folder) is a 400 on every gallery route, before any store access.
    bad = f"{server}/v1/galleries/-bad..name"
    for method, url in [
        ("get", bad),
        ("delete", bad),
        ("delete", f"{bad}/identities/x"),
        ("post", f"{bad}/identify"),
        ("post", f"{bad}/enroll"),
    ]:
        r = requests.request(method, url, headers=AUTH, json={"images": []}, timeout=10)
        assert r.status_code == 400 and "gallery name must match" in r.text, (method, url, r.status_code, r.text)


def test_hr_probes_rank1(server, gallery, orl):
    r = identify(server, gallery, {s: orl[s][1] for s in SUBJECTS}, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] and all(not p["super_resolved"] for p in body["results"])
    first = body["results"][0]
    assert [m["rank"] for m in first["matches"]] == [1, 2, 3]
    assert first["matches"][0]["score"] >= first["matches"][1]["score"] >= first["matches"][2]["score"]
    assert rank1(body) >= 0.95, rank1(body)


def test_lr_probes_not_worse_than_bicubic(server, gallery, orl):
    probes = {s: orl[s][2] for s in SUBJECTS}
    sr = identify(server, gallery, probes)  # auto: 16x12 is low-resolution → super-resolved
    both = identify(server, gallery, probes, concat_bicubic="true")
    bicubic = identify(server, gallery, probes, super_resolve="false")
    assert sr.status_code == both.status_code == bicubic.status_code == 200, (sr.text, both.text, bicubic.text)
    assert all(p["super_resolved"] for p in sr.json()["results"])
    assert not any(p["super_resolved"] for p in bicubic.json()["results"])
    print(
        f"16x12 rank-1: SR {rank1(sr.json()):.3f}, SR ⊕ bicubic {rank1(both.json()):.3f}, "
        f"bicubic {rank1(bicubic.json()):.3f}"
    )
    assert rank1(sr.json()) >= rank1(bicubic.json())
    assert rank1(both.json()) >= rank1(bicubic.json())


def test_bad_images_get_reasons_and_good_ones_answers(server, gallery, orl, bad_inputs):
    probes = {"s1": orl["s1"][1]} | {name: data for name, (data, _) in bad_inputs.items() if name != "gradient.png"}
    probes["s2"] = orl["s2"][2]
    r = identify(server, gallery, probes)
    assert r.status_code == 400
    results = {p["name"]: p for p in r.json()["results"]}
    for name, (_, reason) in bad_inputs.items():
        if name != "gradient.png":
            assert results[name]["error"]["reason"] == reason, results[name]
    assert results["s1"]["matches"][0]["identity"] == "s1"
    assert "matches" in results["s2"] and results["s2"]["super_resolved"]
    # Not base64 at all, and too many images: 400 with a reason, nothing computed.
    bad_b64 = requests.post(f"{server}/v1/superresolve", json={"images": [{"data": "***"}]}, headers=AUTH, timeout=30)
    assert bad_b64.status_code == 400 and bad_b64.json()["results"][0]["error"]["reason"] == "bad_request"
    many = identify(server, gallery, {f"p{i}": orl["s1"][2] for i in range(49)})
    assert many.status_code == 400 and "max_images" in many.json()["detail"]


def test_enroll_with_mtcnn_and_rejects(server, facenet_test_images, bad_inputs):
    photo = (facenet_test_images / "paul_rudd" / "1.jpg").read_bytes()
    gradient, _ = bad_inputs["gradient.png"]
    files = [("image", ("rudd.jpg", photo)), ("image", ("gradient.png", gradient))]
    data = [("identity", "paul_rudd"), ("identity", "nobody")]
    r = requests.post(f"{server}/v1/galleries/people/enroll", files=files, data=data, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text  # no face is a reject, not a client error
    body = r.json()
    assert body["enrolled"] == 1 and [x["reason"] for x in body["rejects"]] == ["no_face"]
    truncated, _ = bad_inputs["truncated.jpg"]
    r = requests.post(
        f"{server}/v1/galleries/people/enroll",
        files=[("image", ("t.jpg", truncated))],
        data=[("identity", "x")],
        headers=AUTH,
        timeout=TIMEOUT,
    )
    assert r.status_code == 400 and r.json()["rejects"][0]["reason"] == "corrupt"
    missing = requests.post(
        f"{server}/v1/galleries/people/enroll", files=[("image", ("a.jpg", photo))], headers=AUTH, timeout=30
    )
    assert missing.status_code == 400
    unknown = identify(server, "nope", {"s1": photo})
    assert unknown.status_code == 404


def test_body_cap_413(server):
    big = b"\xff\xd8\xff" + os.urandom(3 * 2**20)
    r = requests.post(f"{server}/v1/superresolve", files=[("image", ("big.jpg", big))], headers=AUTH, timeout=30)
    assert r.status_code == 413
    chunks = iter([b'{"images": [{"data": "', b"A" * 2**20, b"A" * 2**20, b"A" * 2**20, b'"}]}'])
    r = requests.post(
        f"{server}/v1/superresolve",
        data=chunks,  # a generator: chunked, no Content-Length
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413


def test_superresolve(server, orl, champion):
    r = requests.post(
        f"{server}/v1/superresolve", files=[("image", ("s1.png", orl["s1"][2]))], headers=AUTH, timeout=TIMEOUT
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    from PIL import Image

    from ipsr_model.degradation import back_project, resize
    from ipsr_model.images import to_tensor

    served = Image.open(io.BytesIO(r.content))
    assert served.size == (128, 128)
    # The same pixels as the generator applied here to the bicubic-upscaled probe, then back-projected toward the
    # probe (± PNG rounding): shrunk back, the served face is the probe, which the generator's output alone is not.
    lr = Image.open(io.BytesIO(orl["s1"][2])).convert("RGB")
    with torch.no_grad():
        generated = champion["generator"](to_tensor(lr.resize((128, 128), Image.BICUBIC)))
    expected = back_project(generated, to_tensor(lr))
    assert (to_tensor(served) - expected).abs().max() < 0.02
    size = (lr.height, lr.width)
    agree = [float((resize(x, size) - to_tensor(lr)).abs().mean()) for x in (to_tensor(served), generated)]
    assert agree[0] < agree[1] / 3, agree
    two = requests.post(
        f"{server}/v1/superresolve",
        files=[("image", ("a.png", orl["s1"][2])), ("image", ("b.png", orl["s2"][2]))],
        headers=AUTH,
        timeout=TIMEOUT,
    )
    assert two.status_code == 200 and len(two.json()["results"]) == 2 and two.json()["results"][1]["image"]


def test_overload_503_then_healthy(server, gallery, orl):
    """More concurrent requests than max_ongoing_requests + max_queued_requests: the excess gets 503."""
    probes = {s: orl[s][2] for s in SUBJECTS[:16]}

    def call(_):
        try:
            return identify(server, gallery, probes).status_code
        except requests.RequestException as err:
            return repr(err)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(call, range(24)))
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert requests.get(f"{server}/v1/healthz", timeout=10).status_code == 200
    assert identify(server, gallery, {"s1": orl["s1"][1]}).status_code == 200


def test_alias_switch_without_restart(server, champion):
    from ipsr_platform import tracking

    version = register_generator(champion["generator"], champion["identity_sha"], "candidate")
    tracking.set_alias("ipsr-unet", "champion", version)
    try:
        info = wait_for(
            lambda: (
                (i := requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json())["version"] == version and i
            ),
            30,
            f"version {version} to be served",
        )
        assert info["alias"] == "champion"
    finally:
        tracking.set_alias("ipsr-unet", "champion", champion["version"])


def test_another_replicas_enrolment_is_found_by_identify_alone(server, gallery, orl):
    """A segment another replica wrote (here: written to the store directly) is found within a bounded time by
    identify requests alone, which never read the store: the replica's background refresh picks it up."""
    from ipsr_model.paths import galleries_dir
    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

    store = GalleryStore(str(galleries_dir()), Storage.from_env())
    s1 = store.load(gallery)
    row = s1.identities.tolist().index("s1")
    store.append(gallery, ["s1-twin"], s1.embeddings[row : row + 1], ["twin.pgm"], [None], s1.identity_net_sha256)

    def twin_found() -> bool:
        matches = identify(server, gallery, {"s1": orl["s1"][1]}, top_k=2).json()["results"][0]["matches"]
        return {m["identity"] for m in matches} == {"s1", "s1-twin"}

    wait_for(twin_found, 30, "the other replica's enrolment")
    r = requests.delete(f"{server}/v1/galleries/{gallery}/identities/s1-twin", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["removed_faces"] == 1


def test_gallery_survives_replica_restart(server, gallery, orl, ray_session):
    import ray

    before = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()["replica"]
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "ipsr-test#Identification#" in a["name"]
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    def restarted():
        r = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10)
        return r.status_code == 200 and r.json()["replica"] != before

    wait_for(restarted, 90, "a new replica")
    r = identify(server, gallery, {s: orl[s][1] for s in SUBJECTS[:10]})
    assert r.status_code == 200, r.text
    assert rank1(r.json()) >= 0.9


def test_cli_refuses_to_start_without_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IPSR_SERVE_TOKEN"} | {"IPSR_HOME": str(tmp_path)}
    run = subprocess.run([IPSR, "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no bearer token" in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = subprocess.run(
        [IPSR, "serve", "--insecure-no-auth", "--model", "x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "models:/" in run.stderr, run.stderr


def test_token_rollover_needs_no_restart(tmp_path, monkeypatch):
    """A token file with the current and the next token: both are accepted; the file rewritten with the next one
    alone: the replica's token set drops the old one within its refresh, without a restart. A file broken meanwhile
    keeps the last good set; a short token, or none, is refused at start in one line."""
    import time as clock

    from ipsr_model.errors import UserError
    from ipsr_platform.config import ServeConfig
    from serving.edge import Tokens, authorised, token_sha256

    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    file = tmp_path / "tokens"
    file.write_text(f"# rollover: current, then next\n{old}\n{new}\n")
    cfg = ServeConfig(token_file=str(file))
    tokens = Tokens(token_sha256(cfg), cfg.token_file, refresh_s=0.05)

    def accepts(token: str) -> bool:
        return authorised(f"Bearer {token}".encode(), tokens.current())

    assert accepts(old) and accepts(new) and not accepts("x" * 26) and not authorised(b"", tokens.current())
    file.write_text(f"{new}\n")
    clock.sleep(0.1)
    assert accepts(new) and not accepts(old)
    file.write_text("short\n")  # a broken edit: the replica keeps serving the last good tokens
    clock.sleep(0.1)
    assert accepts(new)
    monkeypatch.setenv("IPSR_SERVE_TOKEN", f"{old},{new}")
    assert len(token_sha256(ServeConfig())) == 2
    with pytest.raises(UserError, match="shorter than 16 characters"):
        token_sha256(cfg)
    monkeypatch.setenv("IPSR_SERVE_TOKEN", " , ")
    with pytest.raises(UserError, match="no bearer token configured"):
        token_sha256(ServeConfig())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gallery_store_is_append_only(where, s3, tmp_path):
    """Segments, tombstones, image_id de-duplication, the legacy one-file layout and a compaction that keeps what
    lands meanwhile; on a local folder and through an S3 API (moto on 127.0.0.1)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ipsr_platform.gallery import GalleryStore, WeightsMismatch
    from ipsr_platform.storage import Storage, join

    if where == "s3":
        s3.create_bucket(Bucket="galleries")
    root = "s3://galleries/prod" if where == "s3" else str(tmp_path / "galleries")
    storage = Storage.from_env()
    store = GalleryStore(root, storage)
    assert store.load("orl") is None
    e = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    # The pre-segment layout: one gallery.parquet, read as the oldest segment.
    legacy = pa.table(
        {
            "identity": ["old"],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e[5]), 512),
            "source": ["o.png"],
            "identity_net_sha256": ["sha"],
            "enrolled_at": [0.0],
        }
    )
    buf = io.BytesIO()
    pq.write_table(legacy, buf)
    storage.write_bytes(join(root, "orl", "gallery.parquet"), buf.getvalue())
    store.append("orl", ["a", "b"], e[:2], ["1.png", "2.png"], ["img-1", None], "sha")
    store.append("orl", ["a", "c"], e[2:4], ["1-again.png", "3.png"], ["img-1", "img-3"], "sha")  # a retry of img-1
    loaded = store.load("orl")
    assert loaded.identities.tolist() == ["old", "a", "b", "c"] and loaded.identity_net_sha256 == "sha"
    np.testing.assert_array_equal(loaded.embeddings[1], e[0])  # the first copy of img-1 is the one kept
    store.delete_identity("orl", "a")
    store.append("orl", ["a"], e[4:5], ["4.png"], [None], "sha")  # enrolled again after the removal: visible
    assert store.load("orl").identities.tolist() == ["old", "b", "c", "a"]
    light, full = store.load("orl", with_embeddings=False), store.load("orl")  # what `ipsr enrol`'s driver reads
    assert light.embeddings.shape == (4, 0) and light.stamp == full.stamp and light.identity_net_sha256 == "sha"
    for column in ("identities", "sources", "image_ids"):
        assert getattr(light, column).tolist() == getattr(full, column).tolist()
    # A concurrent enrolment lands after compaction has listed and read the gallery: it must survive.
    read = store.load

    def read_then_another_replica_enrols(name):
        gallery = read(name)
        store.append(name, ["late"], e[:1], ["late.png"], [None], "sha")
        return gallery

    store.load = read_then_another_replica_enrols
    merged, rows = store.compact("orl")
    store.load = read
    assert (merged, rows) == (5, 4)  # 3 segments, 1 tombstone, the legacy file → one segment of 4 faces
    assert store.load("orl").identities.tolist() == ["old", "b", "c", "a", "late"]
    assert len(store.listing("orl")[0]) == 2 and store.listing("orl")[1:] == ([], False)
    store.append("orl", ["d"], e[:1], ["5.png"], [None], "other-sha")
    with pytest.raises(WeightsMismatch):
        store.load("orl")
    store.delete("orl")
    assert store.load("orl") is None
    with pytest.raises(Exception, match="names a folder"):
        store.folder("../etc")


def test_replica_appends_new_enrolments_without_rereading_the_gallery(tmp_path):
    """What another replica enrolled is merged onto the cached index alone — same answers as a full reload —, and
    anything else (a removal, a compaction, a segment named before the newest) falls back to the full reload."""
    from ipsr_model.identify import best_per_identity
    from ipsr_platform.gallery import GalleryStore, WeightsMismatch
    from ipsr_platform.storage import Storage
    from serving.index import GalleryIndex

    store = GalleryStore(str(tmp_path / "galleries"), Storage.from_env())
    e = torch.nn.functional.normalize(torch.randn(9, 512, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    store.append("g", ["b", "a"], e[:2], ["1", "2"], ["img-1", None], "sha")
    index = GalleryIndex.build(store.load("g"), torch.device("cpu"), "float32")
    assert store.added_since("g", index.gallery).stamp == index.gallery.stamp  # nothing new: nothing read

    store.append("g", ["c", "a"], e[2:4], ["3", "4"], ["img-3", "img-1"], "sha")  # img-1 again: a retry
    store.append("g", ["d"], e[4:5], ["5"], [None], "sha")
    read = []
    store._read_segment, original = (lambda *a: read.append(a) or original(*a)), store._read_segment
    delta = store.added_since("g", index.gallery)
    assert len(read) == 2 and delta.identities.tolist() == ["c", "d"]  # the retried img-1 is not kept twice
    grown, full = index.extended(delta), GalleryIndex.build(store.load("g"), torch.device("cpu"), "float32")
    assert grown.gallery.stamp == full.gallery.stamp and len(grown.gallery) == len(full.gallery) == 4
    for model in (grown, full):  # the same rows, the same best identity per probe, whatever the code order
        best = best_per_identity(torch.from_numpy(e[[0, 1, 2, 4]]), model.embeddings, model.codes, len(model.names))
        assert [model.names[i] for i in best.argmax(1).tolist()] == ["b", "a", "c", "d"]
    assert sorted(grown.names) == sorted(full.names) and grown.gallery.image_id_set == full.gallery.image_id_set
    # Spare rows: an index built at 16 faces has room for 2 more, so the next two enrolments land in place and the
    # third grows it (by N/8); an index still in use by a batch keeps exactly its own rows.
    many = torch.nn.functional.normalize(torch.randn(19, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    store.append("h", [f"p{i}" for i in range(16)], many[:16].numpy(), [""] * 16, [None] * 16, "sha")
    indexes = [GalleryIndex.build(store.load("h"), torch.device("cpu"), "float32")]
    for i, who in zip(range(16, 19), ["p0", "new", "last"]):
        store.append("h", [who], many[i : i + 1].numpy(), [""], [None], "sha")
        indexes.append(indexes[-1].extended(store.added_since("h", indexes[-1].gallery)))
    first, second, third, fourth = (index.room[0].data_ptr() for index in indexes)
    assert first == second == third != fourth
    assert [len(index.embeddings) for index in indexes] == [16, 17, 18, 19]
    torch.testing.assert_close(indexes[-1].embeddings, many)
    assert [indexes[-1].names[c] for c in indexes[-1].codes.tolist()] == [f"p{i}" for i in range(16)] + [
        "p0",
        "new",
        "last",
    ]
    # The last person removed: an empty gallery (it used to fail to load), and enrolling into it works again.
    store.append("solo", ["x"], e[:1], ["x.png"], ["img-x"], "sha")
    store.delete_identity("solo", "x")
    empty = GalleryIndex.build(store.load("solo"), torch.device("cpu"), "float16")
    assert empty.names == [] and tuple(empty.embeddings.shape) == (0, 512)
    store.append("solo", ["y"], e[1:2], ["y.png"], [None], "sha")
    again = empty.extended(store.added_since("solo", empty.gallery))
    assert again.names == ["y"] and tuple(again.embeddings.shape) == (1, 512)

    store.delete_identity("g", "c")
    assert store.added_since("g", grown.gallery) is None  # a removal hides old rows: reload
    before = store.load("g")
    segment = store.listing("g")[0][0]  # a writer whose clock is behind: its segment sorts before the newest
    store.storage.write_bytes(
        f"{store.folder('g')}/segments/{segment}-late.parquet",
        store.storage.read_bytes(f"{store.folder('g')}/segments/{segment}.parquet"),
    )
    assert store.added_since("g", before) is None
    store.compact("g")
    assert store.added_since("g", store.load("g")) is not None and store.added_since("g", before) is None
    before = store.load("g")
    store.append("g", ["e"], e[5:6], ["6"], [None], "other-sha")
    with pytest.raises(WeightsMismatch):
        store.added_since("g", before)


def test_a_person_deleted_through_another_replica_is_never_returned_after_the_delete(tmp_path):
    """A replica whose background refresh is an hour away still never serves a person whose tombstone another
    replica wrote (here: written to the store directly), nor a gallery deleted there: every lookup lists the
    tombstones and applies a new one first; without a new tombstone it reads nothing but that listing."""
    from ipsr_platform.config import ServeConfig
    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage
    from serving.gallery_cache import GalleryCache

    store = GalleryStore(str(tmp_path / "galleries"), Storage.from_env())
    e = torch.nn.functional.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    store.append("g", ["a", "b", "c"], e, ["1", "2", "3"], [None] * 3, "sha")
    cache = GalleryCache(store, ServeConfig(gallery_refresh_s=3600), torch.device("cpu"), "sha")
    try:
        first = cache.get("g")
        assert cache.get("g") is first and store.tombstones("g") == ()
        GalleryStore(store.root, Storage.from_env()).delete_identity("g", "b")  # the other replica's delete
        assert set(cache.get("g").gallery.identities.tolist()) == {"a", "c"}
        assert store.tombstones("g") == tuple(store.listing("g")[1]) and len(store.tombstones("g")) == 1
        store.append("g", ["d"], e[:1], ["4"], [None], "sha")  # an enrolment alone waits for the refresh
        assert set(cache.get("g").gallery.identities.tolist()) == {"a", "c"}
        GalleryStore(store.root, Storage.from_env()).delete("g")  # the whole gallery, through the other replica
        assert store.tombstones("g") is None and cache.get("g") is None
    finally:
        cache.stop()


@pytest.mark.slow
def test_pinned_version_through_the_documented_user_config(server, server_config, champion):
    """serve_config.yaml's `user_config` block, with its commented `generator: models:/ipsr-unet/N` example
    uncommented, deployed by a real serve.run: the pinned version is served; without the key, the alias again."""
    import yaml
    from ray import serve

    from serving.app import build_app

    text = (ROOT / "serving" / "serve_config.yaml").read_text()
    deployments = yaml.safe_load(text.replace("# generator:", "generator:"))["applications"][0]["deployments"]
    block = next(d for d in deployments if d["name"] == "Identification")
    user_config = block["user_config"]
    version = register_generator(champion["generator"], champion["identity_sha"], "pinned-test")
    user_config["generator"] = f"models:/ipsr-unet/{version}"

    def served() -> dict:
        return requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()

    try:
        serve.run(build_app(server_config, user_config=user_config), name="ipsr-test", route_prefix="/")
        info = wait_for(lambda: (i := served())["version"] == version and i, 60, f"pinned version {version}")
        assert info["uri"] == f"models:/ipsr-unet/{version}" and info["alias"] is None
    finally:
        serve.run(build_app(server_config), name="ipsr-test", route_prefix="/")
    info = wait_for(lambda: (i := served())["version"] == champion["version"] and i, 60, "the champion again")
    assert info["alias"] == "champion"


def test_a_misspelt_user_config_key_is_an_error_not_ignored():
    from types import SimpleNamespace

    from serving.app import Identification

    # The check runs before the replica's state is touched, so a bare object stands in for the replica.
    with pytest.raises(ValueError, match=r"unknown user_config key\(s\) \['model'\]; expected \['generator'"):
        Identification.func_or_class.reconfigure(SimpleNamespace(), {"model": "models:/ipsr-unet/1"})


def test_enrolment_is_idempotent_partial_and_inspectable(server, orl, bad_inputs):
    """200 with per-image reasons when something was enrolled; a retried request (same image_id) stores nothing
    twice; 400 only when nothing was usable; GET shows the gallery, DELETE removes a person or the whole gallery."""
    truncated, _ = bad_inputs["truncated.jpg"]
    url = f"{server}/v1/galleries/idem"

    def enrol(items):  # (name, bytes, identity, image_id)
        files = [("image", (n, b)) for n, b, _, _ in items]
        data = [("identity", i) for _, _, i, _ in items] + [("image_id", k) for _, _, _, k in items]
        return requests.post(
            f"{url}/enroll", params={"aligned": "true"}, files=files, data=data, headers=AUTH, timeout=TIMEOUT
        )

    first = enrol([("s1.pgm", orl["s1"][0], "s1", "s1-a"), ("bad.jpg", truncated, "x", "bad-1")])
    assert first.status_code == 200, first.text
    assert (first.json()["enrolled"], first.json()["rejected"]) == (1, 1)
    retry = enrol([("s1.pgm", orl["s1"][0], "s1", "s1-a"), ("bad.jpg", truncated, "x", "bad-1")])
    assert retry.status_code == 200 and retry.json()["already_enrolled"] == 1 and retry.json()["enrolled"] == 0
    assert enrol([("bad.jpg", truncated, "x", "bad-2")]).status_code == 400  # nothing usable
    assert enrol([("s2.pgm", orl["s2"][0], "s2", "s2-a")]).json()["gallery_size"] == 2
    info = requests.get(url, headers=AUTH, timeout=30).json()
    assert (info["size"], info["identities"]) == (2, 2)
    assert info["page"] == [{"identity": "s1", "faces": 1}, {"identity": "s2", "faces": 1}]
    served = requests.get(f"{server}/v1/model", headers=AUTH, timeout=30).json()["serving_identity_net_sha256"]
    assert info["identity_net_sha256"] == served

    removed = requests.delete(f"{url}/identities/s1", headers=AUTH, timeout=30)
    assert removed.status_code == 200 and removed.json()["removed_faces"] == 1
    assert requests.get(url, headers=AUTH, timeout=30).json()["page"] == [{"identity": "s2", "faces": 1}]
    matches = identify(server, "idem", {"s1": orl["s1"][1]}).json()["results"][0]["matches"]
    assert [m["identity"] for m in matches] == ["s2"]  # s1 is gone for every reader
    assert requests.delete(f"{url}/identities/s1", headers=AUTH, timeout=30).status_code == 404
    assert requests.delete(url, headers=AUTH, timeout=30).status_code == 200
    assert requests.get(url, headers=AUTH, timeout=30).status_code == 404
    assert requests.delete(url, headers=AUTH, timeout=30).status_code == 404


def test_gallery_of_other_weights_is_409(server, env, orl):
    import numpy as np

    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

    store = GalleryStore(str(env["home"] / "galleries"), Storage.from_env())
    store.append("foreign", ["x"], np.eye(1, 512, dtype=np.float32), ["x.png"], [None], "0" * 64)
    r = identify(server, "foreign", {"s1": orl["s1"][1]})
    assert r.status_code == 409 and "identity net 000000000000" in r.json()["detail"], r.text
    enrol = requests.post(
        f"{server}/v1/galleries/foreign/enroll",
        params={"aligned": "true"},
        files=[("image", ("s1.pgm", orl["s1"][0]))],
        data=[("identity", "s1")],
        headers=AUTH,
        timeout=TIMEOUT,
    )
    assert enrol.status_code == 409


def test_an_unreadable_gallery_file_is_named_not_a_bare_500(server, env, orl):
    """A segment that is not Parquet (truncated, hand-edited): every route on that gallery says which file, the
    store says it to `ipsr gallery compact` as a one-line error; deleting the file makes the gallery usable again."""
    import numpy as np

    from ipsr_platform.gallery import GalleryStore, UnreadableSegment
    from ipsr_platform.storage import Storage

    store = GalleryStore(str(env["home"] / "galleries"), Storage.from_env())
    store.append("broken", ["x"], np.eye(1, 512, dtype=np.float32), ["x.png"], [None], "0" * 64)
    bad = f"{store.folder('broken')}/segments/{store.listing('broken')[0][0]}-late.parquet"
    store.storage.write_bytes(bad, b"PAR1 not a parquet file")
    with pytest.raises(UnreadableSegment, match="-late.parquet is not a readable gallery segment"):
        store.compact("broken")
    url = f"{server}/v1/galleries/broken"
    for r in (requests.get(url, headers=AUTH, timeout=TIMEOUT), identify(server, "broken", {"s1": orl["s1"][1]})):
        assert r.status_code == 500 and "-late.parquet is not a readable gallery segment" in r.json()["detail"], r.text
    store.storage.delete(bad)
    assert requests.get(url, headers=AUTH, timeout=TIMEOUT).json()["size"] == 1


def test_112x96_probe_is_low_resolution(server, gallery, orl, att_faces):
    """The paper's largest probe size, 112x96, is below the model's 128x128 on every side: upsampled and
    super-resolved, like ORL's 92x112 originals; a face of 128 or more is identified as it is."""
    from PIL import Image

    face = Image.open(io.BytesIO(orl["s1"][1])).convert("RGB")
    sizes = {"112x96": face.resize((96, 112), Image.BICUBIC), "128x128": face}
    answers = {k: identify(server, gallery, {"s1": png(v)}).json()["results"][0] for k, v in sizes.items()}
    original = identify(server, gallery, {"s1": (att_faces / "s1" / "2.pgm").read_bytes()}).json()["results"][0]
    assert answers["112x96"]["super_resolved"] and original["super_resolved"], (answers, original)
    assert answers["128x128"]["super_resolved"] is False


def test_cuda_replicas_reserve_a_gpu():
    from ipsr_platform.config import ServeConfig
    from serving.app import replica_resources

    assert replica_resources(ServeConfig(device="cuda")) == {"num_cpus": 1.0, "num_gpus": 1}
    assert replica_resources(ServeConfig(device="cuda", gpus_per_replica=0.5))["num_gpus"] == 0.5
    assert "num_gpus" not in replica_resources(ServeConfig())


def test_pickle_models_are_refused_unless_allowed(env, champion):
    from ipsr_model.errors import UserError
    from ipsr_platform.models import load_generator

    version = register_generator(champion["generator"], champion["identity_sha"], "pickled", fmt="pickle")
    with pytest.raises(UserError, match="pickle-based format: loading it would run code"):
        load_generator(f"models:/ipsr-unet/{version}")
    assert load_generator(f"models:/ipsr-unet/{version}", allow_pickle=True).version == version
    assert load_generator(f"models:/ipsr-unet/{champion['version']}").version == champion["version"]  # pt2: fine


@pytest.mark.slow
def test_concurrent_enrolments_on_two_replicas_are_all_kept(server, server_config, orl, tmp_path):
    """2 replicas, 120 single-face enrolments from 12 client threads, one replica killed after 40 answers: every
    enrolment answered 200 is in the gallery afterwards (the old read-modify-write kept about two thirds). A local
    gallery root (a reader must never see half a segment); the soak test runs the same on S3."""
    import ray
    from ray import serve

    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage
    from serving.app import build_app

    root = str(tmp_path / "galleries")
    cfg = server_config.model_copy(
        update={
            "galleries": root,
            "num_replicas": 2,
            "cpus_per_replica": 0.25,
            "max_ongoing_requests": 16,
            "max_queued_requests": 512,
        }
    )
    serve.run(build_app(cfg, name="Crowd"), name="ipsr-crowd", route_prefix="/crowd")
    base = f"{server}/crowd"
    wait_for(lambda: requests.get(f"{base}/v1/healthz", timeout=5).status_code == 200, 120, "the crowd app")
    faces = [orl[s][0] for s in SUBJECTS]

    def enrol(i: int) -> tuple[int, int, str | None]:
        try:
            r = requests.post(
                f"{base}/v1/galleries/crowd/enroll",
                params={"aligned": "true"},
                files=[("image", (f"{i}.pgm", faces[i % len(faces)]))],
                data=[("identity", f"person-{i:03d}"), ("image_id", f"img-{i}")],
                headers=AUTH,
                timeout=TIMEOUT,
            )
            return i, r.status_code, r.json().get("replica") if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return i, 0, None

    results, killed = [], False
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            for future in concurrent.futures.as_completed([pool.submit(enrol, i) for i in range(120)]):
                results.append(future.result())
                if len(results) == 40 and not killed:  # mid-enrolment: requests are in flight on both replicas
                    replicas = [
                        a
                        for a in ray.util.list_named_actors(all_namespaces=True)
                        if "SERVE_REPLICA" in a["name"] and "ipsr-crowd#Crowd#" in a["name"]
                    ]
                    assert len(replicas) == 2, replicas
                    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
                    killed = True
        answered = {i for i, status, _ in results if status == 200}
        # Every request carries an image_id: the ingress resends one cut by the kill, so every one is answered 200.
        assert len(answered) == 120, Counter(status for _, status, _ in results)
        assert len({replica for _, status, replica in results if status == 200}) >= 2
        gallery = GalleryStore(root, Storage.from_env()).load("crowd")
        missing = {f"person-{i:03d}" for i in answered} - set(gallery.identities.tolist())
        assert not missing, f"{len(missing)} enrolments answered 200 are gone: {sorted(missing)[:5]}"
        assert len(gallery) == len(set(gallery.identities.tolist()))  # and none is there twice
    finally:
        serve.delete("ipsr-crowd")


# ---------------------------------------------------------------------------------------- bulk enrolment (jobs)


def _enrol_config(env, **overrides):
    from ipsr_platform.config import EnrolConfig

    defaults = {"identity_weights": env["facenet"], "galleries": str(env["home"] / "galleries")}
    return EnrolConfig(**(defaults | overrides))


@pytest.mark.slow
def test_bulk_enrolment_equals_http_enrolment_and_a_rerun_adds_nothing(server, gallery, orl, env, tmp_path):
    """`ipsr enrol --aligned` of the 40 gallery faces the HTTP fixture enrolled: the same embeddings row for row,
    the same identify answers through the running service (picked up without a restart), a rejected file named,
    nothing added by a rerun, and a gallery of other weights refused in one line."""
    import numpy as np
    import pyarrow.parquet as pq

    from ipsr_platform.gallery import GalleryStore, WeightsMismatch
    from ipsr_platform.storage import Storage
    from jobs.enrol import run

    src = tmp_path / "src"
    for s in SUBJECTS:
        (src / s).mkdir(parents=True)
        (src / s / "1.pgm").write_bytes(orl[s][0])
    (src / "s1" / "broken.jpg").write_bytes(b"not an image at all")
    summary = run(_enrol_config(env, input=str(src), gallery="bulk", aligned=True, rows_per_segment=16))
    assert summary.enrolled == 40 and summary.rejected == {"unsupported_format": 1}, summary
    assert summary.segments_written == 3 and summary.gallery_faces == 40  # 16 + 16 + 8: whole segments
    rejects = pq.read_table(summary.rejects_file).to_pylist()
    assert [r["source"] for r in rejects] == [str(src / "s1" / "broken.jpg")]

    store = GalleryStore(str(env["home"] / "galleries"), Storage.from_env())
    bulk, http = store.load("bulk"), store.load(gallery)
    by_name = {n: e for n, e in zip(http.identities.tolist(), http.embeddings)}
    assert sorted(bulk.identities.tolist()) == sorted(SUBJECTS)
    assert np.allclose(bulk.embeddings, np.stack([by_name[n] for n in bulk.identities.tolist()]), atol=1e-5)
    assert set(bulk.image_ids.tolist()) == {f"{s}/1.pgm" for s in SUBJECTS}
    probes = {s: orl[s][2] for s in SUBJECTS}
    answers = [identify(server, name, probes, top_k=1) for name in ("bulk", gallery)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    top = [[r["matches"][0]["identity"] for r in a.json()["results"]] for a in answers]
    assert top[0] == top[1]

    again = run(_enrol_config(env, input=str(src), gallery="bulk", aligned=True))
    assert again.already_enrolled == 40 and again.enrolled == 0 and again.gallery_faces == 40
    store.compact("bulk")  # the job's segments are ordinary ones: one segment after, the same rows and ids
    compacted = store.load("bulk")
    assert len(store.listing("bulk")[0]) == 1 and sorted(compacted.image_ids.tolist()) == sorted(bulk.image_ids)
    assert run(_enrol_config(env, input=str(src), gallery="bulk", aligned=True)).enrolled == 0
    other = tmp_path / "other.pt"
    state = torch.load(env["facenet"], map_location="cpu", weights_only=True)
    torch.save({k: v + 1e-3 if k == "last_bn.bias" else v for k, v in state.items()}, other)
    with pytest.raises(WeightsMismatch, match="holds embeddings of identity net"):
        run(_enrol_config(env, input=str(src), gallery="bulk", aligned=True, identity_weights=str(other)))


@pytest.mark.slow
def test_bulk_enrolment_survives_a_killed_actor(env, att_faces, ray_session, tmp_path):
    """An embedding actor SIGKILLed mid-run: Ray Data restarts it and retries its batch, the run finishes, and the
    gallery holds every face exactly once (no face lost, none doubled)."""
    import signal
    import threading

    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage
    from jobs.enrol import run

    src = tmp_path / "src"
    for s in SUBJECTS:
        (src / s).mkdir(parents=True)
        for i in range(1, 4):
            (src / s / f"{i}.pgm").write_bytes((att_faces / s / f"{i}.pgm").read_bytes())
    galleries = tmp_path / "galleries"
    killed, stop = [], threading.Event()

    def killer() -> None:  # once the first segment is written, kill one embedding actor
        while not stop.is_set() and not killed:
            pids = ray_worker_pids("Embedder")
            if pids and list(galleries.glob("killed/segments/*.parquet")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        result = run(_enrol_config(env, input=str(src), gallery="killed", galleries=str(galleries), aligned=True,
                                   batch_size=4, rows_per_segment=8, num_actors=2))  # fmt: skip
    finally:
        stop.set()
        watcher.join(5)
    assert killed, "no embedding actor was killed before the run ended"
    gallery = GalleryStore(str(galleries), Storage.from_env()).load("killed")
    ids = gallery.image_ids.tolist()
    assert result.enrolled == 120 and len(ids) == 120 and len(set(ids)) == 120, (result, len(ids))
    assert set(ids) == {f"{s}/{i}.pgm" for s in SUBJECTS for i in range(1, 4)}


@pytest.mark.slow
def test_bulk_enrolment_command_aligns_photos_and_fails_when_nothing_enrols(server, env, facenet_test_images,
                                                                            bad_inputs, tmp_path):  # fmt: skip
    """`python -m jobs.enrol` (= `ipsr enrol`) on full photos: MTCNN finds the four faces, the gradient is a
    no_face reject, the service identifies a photo against the new gallery; a folder with no face at all exits 2
    with one line."""
    import ray

    src = tmp_path / "people"
    for person in sorted(facenet_test_images.iterdir()):
        (src / person.name).mkdir(parents=True)
        (src / person.name / "1.jpg").write_bytes((person / "1.jpg").read_bytes())
    for root in (src, tmp_path / "blank"):
        (root / "nobody").mkdir(parents=True)
        (root / "nobody" / "gradient.png").write_bytes(bad_inputs["gradient.png"][0])
    environ = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    flags = ["--identity-weights", env["facenet"], "--galleries", str(env["home"] / "galleries")]
    done = subprocess.run([sys.executable, "-m", "jobs.enrol", "--input", str(src), "--gallery", "photos", *flags],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    flat = " ".join(done.stdout.split())
    assert "enrolled now │ 4" in flat and "rejected │ no_face 1" in flat, done.stdout
    photo = (facenet_test_images / "paul_rudd" / "1.jpg").read_bytes()
    answer = identify(server, "photos", {"rudd": photo}, top_k=1)
    assert answer.status_code == 200 and answer.json()["results"][0]["matches"][0]["identity"] == "paul_rudd"

    empty = subprocess.run([sys.executable, "-m", "jobs.enrol", "--input", str(tmp_path / "blank"), "--gallery", "none",
                            *flags], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = [line for line in empty.stderr.splitlines() if line.startswith("error:")]
    assert empty.returncode == 2 and len(errors) == 1, empty.stderr[-2000:]
    assert errors[0].startswith("error: no face enrolled from 1 input(s) (no_face 1); see "), errors


# ---------------------------------------------------------------------------------------- bulk search (jobs)


@pytest.mark.slow
def test_bulk_identify_gives_the_services_answers(server, gallery, orl, env, tmp_path):
    """`ipsr identify` of 16x12 and HR probes (nested folders, one broken file) against the HTTP-enrolled gallery
    with the served model version: the service's top-3 per probe, scores within fp16 rounding; the SR faces written;
    results are not overwritten unless asked; a rerun with --overwrite replaces them."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from ipsr_model.errors import UserError
    from ipsr_platform.config import IdentifyConfig
    from jobs.identify import run

    version = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()["version"]
    probes = {f"lr/{s}.png": orl[s][2] for s in SUBJECTS[:24]} | {f"hr/{s}.png": orl[s][1] for s in SUBJECTS[24:]}
    src = tmp_path / "probes"
    for name, data in probes.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "lr" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = IdentifyConfig(probes=str(src), gallery=gallery, out=str(tmp_path / "out"), aligned=True, top_k=3,
                         save_sr=True, generator=f"models:/ipsr-unet/{version}", identity_weights=env["facenet"],
                         galleries=str(env["home"] / "galleries"), batch_size=8, gallery_chunk=16,
                         gallery_dtype="float16")  # the service's: the same arithmetic  # fmt: skip
    summary = run(cfg)
    assert (summary.identified, summary.super_resolved, summary.rejected) == (40, 24, {"corrupt": 1})
    rows = pq.read_table(summary.matches_file).to_pylist()
    assert pcsv.read_csv(tmp_path / "out" / "matches.csv").to_pylist() == rows
    answer = identify(server, gallery, probes, top_k=3)
    assert answer.status_code == 200 and {r["model_version"] for r in answer.json()["results"]} == {version}
    for result in answer.json()["results"]:
        mine = [r for r in rows if r["probe"] == result["name"]]
        assert [m["identity"] for m in mine] == [m["identity"] for m in result["matches"]], result["name"]
        assert [m["score"] for m in mine] == pytest.approx([m["score"] for m in result["matches"]], abs=2e-3)
        assert all(m["super_resolved"] == result["super_resolved"] for m in mine)
    assert sorted(p.name for p in (tmp_path / "out" / "sr" / "lr").iterdir()) == sorted(
        f"{s}.png.png" for s in SUBJECTS[:24]
    )
    assert pq.read_table(tmp_path / "out" / "rejects.parquet").column("probe").to_pylist() == ["lr/broken.png"]

    with pytest.raises(UserError, match="holds the results of an earlier run"):
        run(cfg)
    again = run(cfg.model_copy(update={"overwrite": True, "save_sr": False, "limit": 5}))
    assert again.identified == 5 and not (tmp_path / "out" / "sr").exists()
    assert len(pq.read_table(again.matches_file)) == 15


@pytest.mark.slow
def test_bulk_identify_refuses_bad_input_in_one_line(server, gallery, env, tmp_path):
    """An unknown gallery (`python -m jobs.identify` = `ipsr identify`: exit 2, one line), a missing or empty probes
    folder, a gallery of other weights, an unknown model: each one clear error before any result is written."""
    from ipsr_model.errors import UserError
    from ipsr_platform.config import IdentifyConfig
    from jobs.identify import run

    (tmp_path / "empty").mkdir()
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "a.png").write_bytes(b"x")
    other = tmp_path / "other.pt"
    state = torch.load(env["facenet"], map_location="cpu", weights_only=True)
    torch.save({k: v + 1e-3 if k == "last_bn.bias" else v for k, v in state.items()}, other)
    common = {"probes": str(tmp_path / "probes"), "gallery": gallery, "out": str(tmp_path / "out"),
              "identity_weights": env["facenet"], "galleries": str(env["home"] / "galleries")}  # fmt: skip
    argv = [
        arg for key, value in (common | {"gallery": "nobody"}).items() for arg in (f"--{key.replace('_', '-')}", value)
    ]
    done = subprocess.run([sys.executable, "-m", "jobs.identify", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: gallery 'nobody' not found in "), errors
    cases = [
        ({"probes": str(tmp_path / "missing")}, "probes folder not found: "),
        ({"probes": str(tmp_path / "empty")}, "no probe files under "),
        ({"identity_weights": str(other)}, "gallery 'orl' holds embeddings of identity net "),
        ({"generator": "models:/ipsr-unet/999"}, "no registered model version ipsr-unet/999"),
        ({"out": str(tmp_path / "probes" / "out")}, "is inside --probes"),
    ]
    for change, expected in cases:
        with pytest.raises(UserError, match=expected):
            run(IdentifyConfig(**(common | change)))
    # An S3 store that does not answer (a closed port on 127.0.0.1): one line naming the prefix, after the retries.
    from ipsr_platform.storage import RetryPolicy, S3Options, Storage

    dead = Storage(S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", access_key="k",
                             secret_key="s"), RetryPolicy(attempts=2, base_delay_s=0.0))  # fmt: skip
    with pytest.raises(UserError, match="s3://nobucket/probes"):
        run(IdentifyConfig(**(common | {"probes": "s3://nobucket/probes"})), storage=dead)
    assert not (tmp_path / "out").exists()


def start_serve(argv: list[str], environ: dict[str, str], base: str) -> subprocess.Popen:
    """`ipsr serve` in its own process group, once its health check answers. One more start when Ray's local start
    timed out (its raylet's fixed 30 s, missed on an overloaded 2-core box by a third Ray): not what is tested."""
    from ipsr_platform.cluster import LOCAL_START_TIMEOUT

    def up_or_gone(proc: subprocess.Popen) -> bool:
        if proc.poll() is not None:
            return True
        try:
            return requests.get(f"{base}/v1/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    for attempt in (1, 2):
        proc = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)  # fmt: skip
        try:
            wait_for(functools.partial(up_or_gone, proc), 240, "ipsr serve")
        except BaseException:
            stop_process_group(proc)
            raise
        if proc.poll() is None:
            return proc
        err = proc.communicate()[1]
        stop_process_group(proc)  # what its Ray left in the group
        assert attempt == 1 and LOCAL_START_TIMEOUT in err, err[-3000:]
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(gallery, champion, orl, env):
    """`ipsr serve` (its own Ray) sent SIGTERM during a burst of identify requests: the requests already in flight
    are answered whole, later ones are refused (never cut half-way), and the process exits 0 with one line and no
    native stack dump."""
    import signal
    import threading

    port = free_port()
    argv = [IPSR, "serve", "--port", str(port), "--model", f"models:/ipsr-unet/{champion['version']}",
            "--identity-weights", env["facenet"], "--galleries", str(env["home"] / "galleries"), "--max-batch-size",
            "1", "--max-ongoing-requests", "4", "--drain-s", "60"]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user starts it
    base = f"http://127.0.0.1:{port}"
    proc = start_serve(argv, environ, base)
    try:
        probes = {s: orl[s][2] for s in SUBJECTS[:4]}
        first_answer, signalled = threading.Event(), threading.Event()

        def ask(_: int) -> tuple[str, object]:
            try:
                r = identify(base, gallery, probes, top_k=2)
            except requests.ConnectionError as err:  # refused after the stop: fine; a cut body is not
                return ("after" if signalled.is_set() else "before"), err
            first_answer.set()
            return ("after" if signalled.is_set() else "before"), r

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(ask, i) for i in range(24)]
            assert first_answer.wait(120), "no answer before the stop"
            os.kill(proc.pid, signal.SIGTERM)  # the process alone, as `docker stop` and Kubernetes send it
            signalled.set()
            outcomes = [f.result(timeout=180) for f in futures]
        out, err = proc.communicate(timeout=180)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "ipsr serve stopped on SIGTERM" in out and "Traceback" not in err and "*** " not in err, (out, err[-3000:])
    answered = [r for _, r in outcomes if isinstance(r, requests.Response) and r.status_code == 200]
    for r in answered:  # whole answers: parseable, every probe with its matches
        assert [len(x["matches"]) for x in r.json()["results"]] == [2] * len(probes)
    cut = [r for _, r in outcomes if isinstance(r, requests.exceptions.ChunkedEncodingError)]
    assert not cut, cut
    assert len(answered) >= 2, outcomes


def test_fuzzed_requests_get_no_500_and_refusals_change_no_gallery(server, gallery):
    """#28's fuzzer of the HTTP edge (bench/fuzz_edge.py: hostile bodies, images, names, queries, tokens, headers)
    on a small derandomised budget: no 5xx but 503, every 4xx one line, a refused enrolment changes no gallery, an
    answered one is all there, and the replica still answers afterwards. The long random run is the bench's."""
    from bench.fuzz_edge import fuzz

    fuzz(server, TOKEN, examples=120, derandomize=True)
    r = requests.get(f"{server}/v1/galleries/{gallery}", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["identities"] == 40, r.text  # the other tests' gallery untouched


@pytest.mark.slow
def test_soak_with_replica_kills_and_a_hot_swap_keeps_every_acknowledged_write(server, server_config, champion,
                                                                                orl, s3):  # fmt: skip
    """#28's soak (bench/soak.py) for 45 s on an S3 gallery root: 2 replicas, mixed load from 4 clients, a replica
    killed every 10 s while both run (Serve takes 15-60 s here to replace one; the soak waits for that), the alias
    moved at 20 s. Every enrolment answered 200 is there exactly once, a deleted person is not, nor returned by an
    identify sent after the delete was answered (by either replica); no 5xx but 503 (a request cut by a kill is
    resent by the ingress), and 503 only for a request cut by a kill or sent in a kill window; the new version
    answers."""
    from ray import serve

    from bench.soak import broken, soak
    from serving.app import build_app

    register_generator(champion["generator"], champion["identity_sha"], "soak")
    cfg = server_config.model_copy(
        update={"generator": "models:/ipsr-unet@soak", "num_replicas": 2, "cpus_per_replica": 0.25,
                "max_ongoing_requests": 16, "max_queued_requests": 256, "galleries": "s3://soak/galleries"}
    )  # fmt: skip
    s3.create_bucket(Bucket="soak")
    serve.run(build_app(cfg, name="Soak"), name="ipsr-soak", route_prefix="/soak")
    base = f"{server}/soak"
    try:
        wait_for(lambda: requests.get(f"{base}/v1/healthz", timeout=5).status_code == 200, 120, "the soak app")
        swap = lambda: register_generator(champion["generator"], champion["identity_sha"], "soak")  # noqa: E731
        result = soak(base, "ipsr-soak", "Soak", TOKEN, [orl[s][0] for s in SUBJECTS], [orl[s][2] for s in SUBJECTS],
                      seconds=45, kill_every=10, swap_at=20, swap=swap, clients=4)  # fmt: skip
    finally:
        serve.delete("ipsr-soak")
    assert not broken(result), result
    assert result["kills"] >= 1 and result["acknowledged_enrolments"] >= 5, result
    assert result["by_route_status"].get("identify 200", 0) >= 10, result
    assert result["swap"]["version"] and result["swap"]["old_version_answers_after_s"] < 30, result
