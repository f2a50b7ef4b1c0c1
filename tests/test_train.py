"""`ipsr train` end to end: real Ray (Train V2 + Data), real MLflow (SQLite), real S3 API (moto on 127.0.0.1).

All runs use the output of the real `ipsr preprocess` job on 160 ORL faces (16 identities: 12 train, 4 val),
2 CPU workers, batch 8 per worker → 120 // 2 // 8 = 7 steps per epoch, a width-4 U-Net and the real FaceNet.
Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ray_worker_pids

from ipsr_model.errors import UserError

STEPS_PER_EPOCH = 7
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def faces_dataset(ray_session, att_faces, facenet_path, tmp_path_factory) -> str:
    """The real preprocess job's output for the first 160 ORL inputs (s1, s10-s19, s2, s20-s23), with FaceNet's
    HR embeddings (`--hr-embeddings`): one dataset for every run here (a preprocess costs ~40 s of Ray actors)."""
    from ipsr_platform.config import PreprocessConfig
    from jobs.preprocess import run

    out = tmp_path_factory.mktemp("faces") / "aligned"
    manifest = run(
        PreprocessConfig(
            input=str(att_faces), output=str(out), limit=160, split={"val": 0.35}, hr_embeddings=facenet_path
        )
    )
    assert manifest["counts"]["splits"]["train"] == 120 and manifest["counts"]["splits"]["val"] == 40, manifest
    return str(out)


@pytest.fixture(scope="module")
def facenet_path() -> str:
    """The cached CASIA-WebFace FaceNet as a path source (tests move $IPSR_HOME, the weights cache stays put)."""
    from ipsr_model.weights import fetch_identity_weights

    return str(fetch_identity_weights("casia-webface-offline"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $IPSR_HOME: embedded MLflow (SQLite) and default run storage live here."""
    monkeypatch.setenv("IPSR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def make_config(data: str, facenet: str, **overrides):
    from ipsr_platform.config import TrainConfig

    settings = dict(
        data=data, run_name="run", num_workers=2, batch_size=8, base_channels=4, identity_weights=facenet,
        checkpoint_every=3, log_every=2, keep_checkpoints=1, max_failures=0, grid_faces=2, lr_warmup_steps=6,
        lr_schedule="cosine", embedding_loss="distance",  # Eq. 2: its identity term carries most of the gradient
    ) | overrides  # fmt: skip
    return TrainConfig(**settings)


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (process title ``ray::RayTrainWorker…``)."""
    return ray_worker_pids("RayTrainWorker")


def committed_step(run_dir: Path) -> int:
    """Step of the latest checkpoint Ray Train has committed for this run (0 when none yet)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_s3_checkpoints_mlflow_and_registry(faces_dataset, facenet_path, home, s3, capsys):
    import mlflow
    import pyarrow.fs as pafs
    from PIL import Image

    from ipsr_model import checkpoint
    from ipsr_model.degradation import degrade
    from ipsr_model.identity import IdentityNet
    from ipsr_model.images import from_uint8
    from ipsr_model.unet import UNetGenerator
    from ipsr_platform import tracking
    from ipsr_platform.storage import Storage
    from jobs.train import train
    from jobs.train_data import inspect_dataset

    s3.create_bucket(Bucket="ckpts")
    config = make_config(faces_dataset, facenet_path, epochs=2, storage="s3://ckpts/runs")
    summary = train(config)
    assert "HR embeddings: precomputed" in capsys.readouterr().out  # the dataset has them, the weights match

    total = 2 * STEPS_PER_EPOCH
    assert summary.steps == total and summary.resumed_from_step == 0
    assert set(summary.val_rank1) == {"HR", "16x12", "21x15", "32x32", "mean"} and summary.val_rank1["HR"] == 1.0
    assert summary.model_version == "1" and summary.checkpoint == f"s3://ckpts/runs/run/checkpoint_step{total:09d}"

    # Checkpoints live in S3: keep_checkpoints=1 keeps the best validated one plus the latest; the step
    # checkpoints (3, 6, 9, 12) carry no validation and are gone.
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="runs/run/").get("Contents", [])}
    kept = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_step")})
    assert f"checkpoint_step{total:09d}" in kept
    assert set(kept) <= {f"checkpoint_step{STEPS_PER_EPOCH:09d}", f"checkpoint_step{total:09d}"}, kept
    assert "runs/run/ipsr_run.json" in keys

    # MLflow: the embedded SQLite store under $IPSR_HOME.
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{(home / 'mlflow.db').resolve()}"
    client = tracking.client(uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["batch_size"] == "8" and run.data.params["plan.steps_per_epoch"] == str(STEPS_PER_EPOCH)
    assert run.data.params["plan.hr_embeddings"] == "precomputed"
    for key in ("loss/total", "loss/embedding", "loss/pixel", "throughput/img_per_s", "batch/distinct_identities"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [2, 4, 6, 7, 8, 10, 12, 14], key
        assert all(m.value > 0 and m.value == m.value for m in history), key
    for size in ("16x12", "21x15", "32x32"):
        model = client.get_metric_history(run.info.run_id, f"val/rank1/model/{size}")
        assert [m.step for m in model] == [STEPS_PER_EPOCH, total] and all(0 <= m.value <= 1 for m in model)
        assert client.get_metric_history(run.info.run_id, f"val/rank1/bicubic/{size}")
    assert client.get_metric_history(run.info.run_id, "val/rank1/HR")[-1].value == 1.0  # FaceNet on HR val faces
    # Each term's share of the gradient entering the generator: Eq. 2's identity term is alive.
    shares = {
        k: [m.value for m in client.get_metric_history(run.info.run_id, f"grad_share/{k}")]
        for k in ("embedding", "pixel")
    }
    assert len(shares["embedding"]) == 8 and all(0.5 < e < 1 for e in shares["embedding"]), shares
    assert all(abs(e + p - 1) < 1e-4 for e, p in zip(shares["embedding"], shares["pixel"]))
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert (
        lrs[:3] == sorted(lrs[:3]) and max(lrs) == pytest.approx(config.lr) and lrs[-1] < config.lr
    )  # warm-up, cosine
    assert run.data.params["embedding_loss"] == "distance" and run.data.params["residual"] == "True"
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "grids")]
    assert grids == [f"grids/step{STEPS_PER_EPOCH:07d}_epoch001.png", f"grids/step{total:07d}_epoch002.png"]
    grid_file = client.download_artifacts(run.info.run_id, grids[-1], str(home / "dl"))
    with Image.open(grid_file) as grid:  # 3 sizes x 2 faces rows, LR | SR | HR columns, 2 px padding
        assert grid.format == "PNG" and grid.size == (3 * 130 + 2, 6 * 130 + 2)

    # Registry: version 1 @candidate with provenance tags; it loads back and super-resolves a batch.
    version = client.get_model_version_by_alias("ipsr-unet", "candidate")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    manifest = Path(faces_dataset, "manifest.json").read_bytes()
    assert version.tags[tracking.TAG_DATA_MANIFEST] == hashlib.sha256(manifest).hexdigest()
    assert version.tags[tracking.TAG_IDENTITY_NET] == IdentityNet(facenet_path).weights_sha256
    assert len(version.tags[tracking.TAG_GIT_COMMIT]) >= 7
    assert version.tags["embedding_loss"] == "distance" and version.tags["residual"] == "True"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/ipsr-unet@candidate")
    data = inspect_dataset(config, Storage.from_env())
    faces = from_uint8(torch.from_numpy(data.val_probe[:3].copy()))
    low = degrade(faces, (16, 12))
    with torch.no_grad():
        sr = loaded(low)
    assert sr.shape == (3, 3, 128, 128) and sr.abs().max() <= 1.0
    # It is the final checkpoint's generator.
    local = home / "final"
    local.mkdir()
    source_fs, source_path = Storage.from_env().resolve(summary.checkpoint)
    pafs.copy_files(source_path, str(local), source_filesystem=source_fs)
    generator = UNetGenerator(4, residual=True)
    generator.load_state_dict(checkpoint.load(local)["generator"])
    with torch.no_grad():
        assert torch.allclose(sr, generator.eval()(low), atol=1e-5)

    # Rerunning the finished command changes nothing.
    again = train(config)
    assert again.already_finished and again.model_version == "1"
    assert [str(v.version) for v in client.search_model_versions("name='ipsr-unet'")] == ["1"]


# ------------------------------------------------------------------------------------------ fault tolerance


def _kill_one_worker_after_checkpoint(
    run_dir: Path, killed: list[int], stop: threading.Event, earlier: set[int]
) -> None:
    """Watcher thread: once a checkpoint is committed, SIGKILL one of this run's workers (bounded wait)."""
    deadline = time.monotonic() + 240
    while not stop.is_set() and time.monotonic() < deadline:
        if committed_step(run_dir) >= 3:
            pids = sorted(set(train_worker_pids()) - earlier)
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("max_failures", [1, 0])
def test_killed_worker(faces_dataset, facenet_path, home, max_failures):
    """A worker killed mid-run: with max_failures=1 the run restarts from the last checkpoint and ends at the
    right step; with max_failures=0 it fails loudly and nothing is registered."""
    from ipsr_platform import tracking
    from jobs.train import train

    total = 9  # checkpoints at 3, 6, 7 (epoch end), 9
    # Pixel loss only: what is under test is the restart, and FaceNet's backward would be most of each step.
    config = make_config(faces_dataset, facenet_path, max_steps=total, max_failures=max_failures, embedding_loss="none")
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_one_worker_after_checkpoint,
        args=(home / "runs" / "run", killed, stop, set(train_worker_pids())),
        daemon=True,
    )
    watcher.start()
    try:
        if max_failures == 0:
            with pytest.raises(Exception, match="(?i)fail|died|exit|kill"):
                train(config)
        else:
            summary = train(config)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert killed, "the watcher never killed a worker"

    record = json.loads((home / "runs" / "run" / "ipsr_run.json").read_text())
    client = tracking.client()
    run = client.get_run(record["mlflow_run_id"])
    if max_failures == 0:
        assert run.info.status == "FAILED" and record["status"] == "running"
        assert not client.search_registered_models("name='ipsr-unet'")
        return
    assert summary.steps == total
    assert 3 <= summary.resumed_from_step < total, summary  # restarted from a checkpoint, not from scratch
    assert run.info.status == "FINISHED" and run.data.tags["ipsr.attempt_resumed_from_step"] != "0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")][-1] == total


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(faces_dataset, facenet_path, home, ray_session):
    """The driver dies after a checkpoint; rerunning the same command continues at the saved step."""
    total = 12
    flags = [
        "--data", faces_dataset, "--run-name", "run", "--max-steps", str(total), "--num-workers", "2",
        "--batch-size", "8", "--base-channels", "4", "--identity-weights", facenet_path, "--checkpoint-every", "3",
        "--log-every", "2", "--max-failures", "0", "--keep-checkpoints", "1", "--embedding-loss", "none",
    ]  # fmt: skip
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run_dir = home / "runs" / "run"
    log_file = home.parent / "driver.log"
    with open(log_file, "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", *flags], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    def checkpoint_or_driver_gone() -> int:
        if driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) early:\n{log_file.read_text()[-3000:]}")
        return committed_step(run_dir)

    try:
        wait_until(checkpoint_or_driver_gone, 240, "the first checkpoint", interval=0.1)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    wait_until(lambda: not train_worker_pids(), 60, "the dead driver's workers to go")
    saved = committed_step(run_dir)
    assert 3 <= saved < total
    first_run_id = json.loads((run_dir / "ipsr_run.json").read_text())["mlflow_run_id"]

    rerun = subprocess.run(
        [sys.executable, "-m", "jobs.train", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"run run: {total} steps (resumed from step {saved});" in rerun.stdout, rerun.stdout
    record = json.loads((run_dir / "ipsr_run.json").read_text())
    assert record["status"] == "finished" and record["mlflow_run_id"] == first_run_id
    assert record["summary"]["steps"] == total and record["summary"]["resumed_from_step"] == saved


# ------------------------------------------------------------------------------------------- user mistakes


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors(faces_dataset, facenet_path, home, tmp_path):
    from ipsr_platform.config import TrainConfig, build_config
    from jobs.train import train

    with pytest.raises(UserError, match="no such dataset"):
        train(make_config(str(tmp_path / "nowhere"), facenet_path, max_steps=1))
    half = tmp_path / "half"
    half.mkdir()
    (half / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="no _SUCCESS marker"):
        train(make_config(str(half), facenet_path, max_steps=1))
    with pytest.raises(UserError, match="not both"):
        build_config(TrainConfig, env_prefix="IPSR_TRAIN_", data="x", run_name="r", epochs=1, max_steps=2)
    with pytest.raises(UserError, match="fewer than"):
        train(make_config(faces_dataset, facenet_path, max_steps=1, batch_size=64))

    # A run record from an earlier start with other settings blocks a "resume" that would train something else.
    run_dir = home / "runs" / "run"
    run_dir.mkdir(parents=True)
    earlier = make_config(faces_dataset, facenet_path, max_steps=5, base_channels=8)
    (run_dir / "ipsr_run.json").write_text(json.dumps({"config": earlier.model_dump(mode="json")}))
    with pytest.raises(UserError, match="base_channels 8 -> 4"):
        train(make_config(faces_dataset, facenet_path, max_steps=5))


def test_cli_user_error_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--data", str(tmp_path), "--run-name", "r", "--max-steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --data {tmp_path} has no _SUCCESS marker: not a finished "
        "`ipsr preprocess` output (still running, or interrupted? rerun preprocess)"
    ]


# ------------------------------------------------------------------------------------------------ fast units


def test_gpu_step_path_bf16_channels_last_runs_on_cpu(facenet_path):
    """The GPU code path (bf16 autocast, channels_last) is plain torch: check its dtypes on CPU autocast."""
    from ipsr_model.degradation import MultiScaleDegradation
    from ipsr_model.identity import IdentityNet
    from ipsr_model.images import from_uint8
    from ipsr_model.losses import IdentityPreservingLoss
    from ipsr_model.training import make_optimizer, training_step
    from ipsr_model.unet import UNetGenerator

    identity_net = IdentityNet(facenet_path).to(memory_format=torch.channels_last)
    generator = UNetGenerator(4).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(generator)
    hr = from_uint8(torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8), torch.channels_last)
    assert hr.is_contiguous(memory_format=torch.channels_last) and -1 <= hr.min() and hr.max() <= 1
    before = [p.detach().clone() for p in generator.parameters()]
    terms = training_step(
        generator, IdentityPreservingLoss(identity_net), optimizer, hr, MultiScaleDegradation(),
        torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms)
    assert all(p.dtype == torch.float32 for p in generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters()))


def test_loss_and_schedule_options(monkeypatch):
    """Pixel-only + residual output, no view jitter by default (the CelebA ablation's rule, bench/RESULTS.md); every
    option from flags or IPSR_TRAIN_* env; bad values are one clear error."""
    from ipsr_model.errors import UserError
    from ipsr_platform.config import TrainConfig, build_config

    default = TrainConfig(data="d", run_name="r")
    assert (default.embedding_loss, default.residual, default.identity_jitter) == ("none", True, 0.0)
    assert (default.lr_warmup_steps, default.lr_schedule) == (0, "constant")
    monkeypatch.setenv("IPSR_TRAIN_EMBEDDING_LOSS", "distance")
    cfg = build_config(
        TrainConfig, env_prefix="IPSR_TRAIN_", data="d", run_name="r", residual=False, lr_warmup_steps=50
    )
    assert (cfg.embedding_loss, cfg.residual, cfg.lr_warmup_steps) == ("distance", False, 50)
    with pytest.raises(UserError, match="embedding_loss"):
        build_config(TrainConfig, env_prefix="IPSR_TRAIN_", data="d", run_name="r", embedding_loss="l1")


def test_warmup_then_cosine_schedule():
    from ipsr_model.training import make_optimizer, make_scheduler
    from ipsr_model.unet import UNetGenerator

    optimizer = make_optimizer(UNetGenerator(4), lr=1e-3)
    scheduler = make_scheduler(optimizer, total_steps=20, warmup_steps=4, schedule="cosine")
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] > 1e-4
    with pytest.raises(ValueError, match="constant, cosine"):
        make_scheduler(optimizer, total_steps=20, schedule="step")


def test_cpu_split_leaves_cpus_to_ray_data():
    from ipsr_platform.config import TrainConfig
    from jobs.train import cpus_per_worker

    def split(cpus, **kw):
        return cpus_per_worker(TrainConfig(data="d", run_name="r", **kw), cpus)

    assert split(2, num_workers=2) == 0.5  # this box: 1 CPU for the two workers, 1 for ingest
    assert split(2, num_workers=1) == 1.0
    assert split(16, num_workers=1) == 12.0  # a quarter stays with ingest
    assert split(16, num_workers=1, gpu=True) == 8.0  # GPU: half the node decodes
    assert split(16, num_workers=4, gpu=True) == 2.0
    assert split(2, num_workers=2, cpus_per_worker=0.25) == 0.25


def test_precomputed_hr_embedding_is_the_same_step():
    """With the HR embeddings given (and no jitter), the step's loss and update are those of computing them."""
    from ipsr_model.degradation import MultiScaleDegradation
    from ipsr_model.identify import embed
    from ipsr_model.identity import IdentityNet
    from ipsr_model.losses import IdentityPreservingLoss
    from ipsr_model.training import make_optimizer, training_step
    from ipsr_model.unet import UNetGenerator

    torch.manual_seed(0)
    identity_net = IdentityNet("none", allow_random=True)
    hr = torch.rand(4, 3, 128, 128) * 2 - 1
    results = []
    for given in (None, embed(identity_net, hr)):
        torch.manual_seed(1)
        generator = UNetGenerator(4)
        stats = training_step(
            generator,
            IdentityPreservingLoss(identity_net),
            make_optimizer(generator),
            hr,
            MultiScaleDegradation(),
            torch.Generator().manual_seed(0),
            hr_embedding=given,
        )
        results.append((stats.total, [p.detach().clone() for p in generator.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params_a, params_b))


def test_preprocess_stores_hr_embeddings_train_uses_them_when_they_match(faces_dataset, facenet_path):
    """`ipsr preprocess --hr-embeddings` stores FaceNet's embedding of each stored face; `ipsr train` uses them
    when the weights match and jitter is off, and says why not otherwise (the end-to-end run above trains on them)."""
    import pyarrow.dataset as pads

    from ipsr_model.identify import embed
    from ipsr_model.identity import IdentityNet
    from ipsr_model.images import to_tensor
    from ipsr_platform.faces import decode_face
    from ipsr_platform.storage import Storage
    from jobs.train_data import hr_embeddings_use, inspect_dataset

    net = IdentityNet(facenet_path)
    manifest = json.loads(Path(faces_dataset, "manifest.json").read_text())
    assert manifest["hr_embeddings"]["identity_net_sha256"] == net.weights_sha256
    table = pads.dataset(str(Path(faces_dataset, "data"))).to_table(columns=["image", "hr_embedding"]).slice(0, 8)
    stored = torch.tensor(table.column("hr_embedding").to_pylist())
    with torch.inference_mode():
        expected = embed(net, to_tensor([decode_face(b) for b in table.column("image").to_pylist()]))
    assert stored.shape == (8, 512) and torch.allclose(stored, expected, atol=1e-4)

    config = make_config(faces_dataset, facenet_path, identity_jitter=0.0)
    data = inspect_dataset(config, Storage.from_env())
    assert hr_embeddings_use(config, data, net.weights_sha256)[0] is True
    assert hr_embeddings_use(config, data, "0" * 64) == (
        False,
        "computed each step (the dataset's were made with other FaceNet weights)",
    )
    jittered = make_config(faces_dataset, facenet_path, identity_jitter=0.05)
    assert "jitter" in hr_embeddings_use(jittered, data, net.weights_sha256)[1]


@pytest.mark.slow
def test_batches_mix_identities_at_vggface2_shape(ray_session, facenet_path, home, tmp_path):
    """100 identities × 8 images, shards of 24 rows: identity-sorted shards (3 people each) gave batches of few
    people even after file shuffling and the local shuffle buffer (0.84 × batch at 100 × 100 in shards of 300).
    Preprocess writes rows in hash order, so a batch of 12 holds about as many identities as a random draw of 12
    from 97 (11.3 expected); measured through the real jobs and MLflow. Small images, a 48 px detector and one
    checkpoint (at the end) keep the 800 faces fast."""
    from bench.synth_faces import synthesize
    from ipsr_platform import tracking
    from ipsr_platform.config import PreprocessConfig
    from jobs.preprocess import run
    from jobs.train import train

    src, out = tmp_path / "vggface2", tmp_path / "aligned"
    synthesize(str(src), 800, per_identity=8, workers=2, sides=(64, 96))
    manifest = run(
        PreprocessConfig(
            input=str(src / "train"),
            output=str(out),
            split={"val": 0.03},
            detect_size=48,
            min_face_size=12,
            rows_per_shard=24,
        )
    )
    assert manifest["counts"]["aligned"] >= 0.95 * 800, manifest["counts"]
    assert {f["split"] for f in manifest["files"]} == {"train", "val"}
    assert all(f["path"].startswith(f"data/{f['split']}/") for f in manifest["files"])

    batch = 12
    summary = train(
        make_config(
            str(out),
            facenet_path,
            max_steps=30,
            checkpoint_every=30,
            batch_size=batch,
            log_every=3,
            embedding_loss="none",
            lr_warmup_steps=0,
        )
    )
    client = tracking.client(tracking.tracking_uri())
    distinct = [m.value for m in client.get_metric_history(summary.mlflow_run_id, "batch/distinct_identities")]
    assert len(distinct) == 10 and all(1 <= d <= batch for d in distinct), distinct
    assert sum(distinct) / len(distinct) >= 0.9 * batch, distinct
