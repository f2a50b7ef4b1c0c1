"""`ipsr train`: the IPU-Net U-Net on a preprocessed face dataset, with Ray Train + Ray Data + MLflow — the driver.

``train(config)`` checks the dataset (``jobs.train_data.inspect_dataset``: ``_SUCCESS``, shards per split,
columns, the AR-style validation pairs), sizes the run (steps per epoch = train rows // workers // batch), opens or
resumes the MLflow run recorded in ``<storage>/<run-name>/ipsr_run.json``, runs a ``TorchTrainer`` whose workers
run ``jobs.train_worker.train_loop`` with a typed ``Plan``, then logs the final generator to MLflow (``pt2``) and
registers it (alias ``candidate`` + provenance tags).

Resuming is Ray Train V2's: a restarted worker group (``FailureConfig.max_failures``) or a rerun of the same
command (same ``storage`` + ``run_name``) continues from the latest checkpoint, so the total step count is the same
as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ipsr_model import checkpoint
from ipsr_model.degradation import degrade, parse_size
from ipsr_model.errors import UserError
from ipsr_model.images import from_uint8
from ipsr_platform import cluster, console, tracking
from ipsr_platform.commands import job_command, run_main
from ipsr_platform.config import TrainConfig
from ipsr_platform.storage import Storage, join, normalize
from jobs.train_data import CACHE_MAX_FACES, DatasetInfo, hr_embeddings_use, inspect_dataset, train_dataset
from jobs.train_worker import SCORE, Plan, train_loop

log = logging.getLogger(__name__)

RUN_RECORD = "ipsr_run.json"
# Settings a rerun may change; any other difference would make "resume" train a different model.
RESUMABLE_FIELDS = frozenset(
    {
        "max_failures",
        "cpus_per_worker",
        "log_every",
        "compile",
        "register_as",
        "checkpoint_every",
        "keep_checkpoints",
        "grid_faces",
    }
)


@contextlib.contextmanager
def _step_progress(run_id: str, uri: str, steps_per_epoch: int, total_steps: int):
    """A progress bar of optimiser steps while ``trainer.fit()`` blocks: rank 0 logs ``epoch`` to MLflow every
    ``log_every`` steps, and a thread reads it back every 2 s (one small registry call; stops with the fit)."""
    stop = threading.Event()
    with console.progress("train", total_steps, "steps") as advance:

        def follow() -> None:
            shown, client = 0, tracking.client(uri)  # one client: each would open its own store connection
            while not stop.wait(2.0):
                with contextlib.suppress(Exception):  # the tracking server may blink; the bar can wait
                    epoch = client.get_run(run_id).data.metrics.get("epoch", 0.0)
                    step = min(total_steps, round(epoch * steps_per_epoch))
                    if step > shown:
                        advance(step - shown)
                        shown = step

        thread = threading.Thread(target=follow, name="ipsr-train-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)


def cpus_per_worker(config: TrainConfig, cluster_cpus: float) -> float:
    """CPUs each training worker claims. The rest is Ray Data's: a trainer that takes every CPU starves ingest.

    CPU training: a quarter of the cluster's CPUs (at least 1) stays with ingest, the workers share the rest.
    GPU training: the step runs on the GPU, so each worker keeps a few CPUs for its Python loop and
    host→device copies and ingest gets the remaining (at least half).
    """
    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    n = config.num_workers
    if config.gpu:
        return float(max(1, min(8, int(cluster_cpus / 2 / n))))
    spare = max(1.0, 0.25 * cluster_cpus)
    return max(0.25, math.floor((cluster_cpus - spare) / n * 100) / 100)


def _write_json(storage: Storage, uri: str, obj: dict) -> None:
    storage.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())  # atomic (Storage.write_bytes)


@dataclass(frozen=True)
class TrainResult:
    """What `ipsr train` answers; kept (as a dict) in the run record, so that rerunning a finished run answers the
    same."""

    run_name: str
    mlflow_run_id: str
    model: str  # the registered name
    model_version: str
    model_uri: str  # models:/<name>@candidate
    steps: int
    resumed_from_step: int
    checkpoint: str  # the last checkpoint's URI
    val_rank1: dict[str, float]  # val size (and "HR", "mean") → rank-1 at the last validation
    already_finished: bool = False  # this call found the run finished and did nothing


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training job described by ``config``."""
    from ipsr_model.paths import runs_dir
    from ipsr_model.weights import load_identity_weights

    storage = Storage.from_env()
    data = inspect_dataset(config, storage)
    _, identity_sha256 = load_identity_weights(config.identity_weights)  # fails here, not in every worker
    uri = tracking.tracking_uri()
    storage_root = normalize(config.storage or str(runs_dir()))
    record_uri = join(storage_root, config.run_name, RUN_RECORD)
    record = _earlier_record(config, storage, record_uri, storage_root, uri)
    if record is not None and record.get("status") == "finished":
        log.info("run %s already finished: %s", config.run_name, record["summary"])
        return TrainResult(**{**record["summary"], "already_finished": True})
    if data.n_train == 0:
        raise UserError(f"--data {data.uri}: the train split is empty")
    use_embeddings, why = hr_embeddings_use(config, data, identity_sha256)
    console.say(f"HR embeddings: {why}")
    if not data.mixed:
        console.say(f"warning: {data.uri} holds every split in identity-sorted shards (an older `ipsr preprocess`): "
                    "batches will hold few identities; rerun preprocess with --overwrite to mix them")  # fmt: skip
    cpus, steps_per_epoch, total_steps = _size_run(config, data)
    plan_params = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "train_faces": data.n_train,
        "val_identities": len(data.val_labels),
        "cpus_per_worker": cpus,
        "data_manifest_sha256": data.manifest_sha256,
        "identity_net_sha256": identity_sha256,
        "hr_embeddings": "precomputed" if use_embeddings else "computed",
    }
    record = _start_or_resume(config, storage, record_uri, record, plan_params, uri)
    plan = Plan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        threads_per_worker=max(1, int(cpus)),
        identity_net_sha256=identity_sha256,
        data_manifest_sha256=data.manifest_sha256,
        mlflow_run_id=record["mlflow_run_id"],
        experiment_id=record["experiment_id"],
        tracking_uri=uri,
        val_labels=data.val_labels,
        val_gallery=data.val_gallery,
        val_probe=data.val_probe,
    )
    dataset = train_dataset(data, use_embeddings, cache=data.n_train <= CACHE_MAX_FACES)
    last = _fit(config, plan, dataset, storage, storage_root, cpus)
    with last.as_directory() as directory:
        state = checkpoint.load(directory)
    if state["step"] != total_steps:
        raise RuntimeError(f"run {config.run_name}: last checkpoint is at step {state['step']}, expected {total_steps}")

    run_id = record["mlflow_run_id"]
    version = _log_and_register(config, state, data, identity_sha256, run_id, uri)
    summary = _summary(config, state, run_id, version, join(storage_root, config.run_name, Path(last.path).name))
    tracking.set_run_status(run_id, "FINISHED", uri)
    _write_json(storage, record_uri, {**record, "status": "finished", "summary": asdict(summary)})
    return summary


def _summary(config: TrainConfig, state: dict[str, Any], run_id: str, version: str, checkpoint_uri: str) -> TrainResult:
    metrics = state["metrics"]
    return TrainResult(
        run_name=config.run_name,
        mlflow_run_id=run_id,
        model=config.register_as,
        model_version=version,
        model_uri=f"models:/{config.register_as}@{tracking.CANDIDATE}",
        steps=int(state["step"]),
        resumed_from_step=int(metrics.get("resumed_from_step", 0)),
        checkpoint=checkpoint_uri,
        val_rank1={k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
        | {"mean": metrics[SCORE]},
    )


def _earlier_record(config: TrainConfig, storage: Storage, record_uri: str, storage_root: str, uri: str) -> dict | None:
    """The run record of an earlier attempt of this run, checked to be resumable with ``config``; None if new."""
    if not storage.exists(record_uri):
        return None
    record = json.loads(storage.read_bytes(record_uri))
    saved, now = record["config"], config.model_dump(mode="json")
    if conflicts := _changes(saved, now, sorted((saved.keys() | now.keys()) - RESUMABLE_FIELDS)):
        raise UserError(
            f"run {config.run_name!r} in {storage_root} was started with other settings ({'; '.join(conflicts)}); "
            "rerun it with the same settings to resume, or pick a new --run-name"
        )
    if record["tracking_uri"] != uri:
        raise UserError(
            f"run {config.run_name!r} logs to MLflow at {record['tracking_uri']}, but the tracking URI is now "
            f"{uri}; set MLFLOW_TRACKING_URI back to resume it"
        )
    if record.get("status") != "finished" and not tracking.run_exists(record["mlflow_run_id"], uri):
        raise UserError(
            f"run {config.run_name!r} points at MLflow run {record['mlflow_run_id']}, which {uri} does not have"
        )
    return record


def _changes(before: dict, after: dict, names) -> list[str]:
    """``name old -> new`` for each of ``names`` whose value differs."""
    return [f"{n} {before.get(n)!r} -> {after.get(n)!r}" for n in names if before.get(n) != after.get(n)]


def _size_run(config: TrainConfig, data: DatasetInfo) -> tuple[float, int, int]:
    """(CPUs per worker, steps per epoch, total steps), checked against the cluster and the dataset."""
    import ray

    cluster.connect()
    resources = ray.cluster_resources()
    cluster_cpus, cluster_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    cpus = cpus_per_worker(config, cluster_cpus)
    if cpus * config.num_workers > cluster_cpus:
        raise UserError(
            f"{config.num_workers} workers x {cpus:g} CPUs exceed the cluster's {cluster_cpus:g} CPUs "
            "(lower --num-workers or --cpus-per-worker)"
        )
    if config.gpu and cluster_gpus < config.num_workers:
        raise UserError(
            f"--gpu with {config.num_workers} workers needs {config.num_workers} GPUs; the cluster has {cluster_gpus:g}"
        )
    steps_per_epoch = data.n_train // config.num_workers // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"--data {data.uri}: {data.n_train} train faces are fewer than --num-workers x --batch-size "
            f"({config.num_workers} x {config.batch_size})"
        )
    return cpus, steps_per_epoch, config.max_steps or config.num_epochs * steps_per_epoch


def _start_or_resume(
    config: TrainConfig, storage: Storage, record_uri: str, record: dict | None, plan_params: dict, uri: str
) -> dict:
    """A new run: its MLflow run and record. A resumed one: its record, if the same steps still mean the same."""
    if record is not None:
        if changed := _changes(
            record["plan"],
            plan_params,
            ("steps_per_epoch", "total_steps", "data_manifest_sha256", "identity_net_sha256"),
        ):
            raise UserError(
                f"run {config.run_name!r} cannot resume: its dataset, identity weights or cluster changed since it "
                f"started ({'; '.join(changed)}); pick a new --run-name"
            )
        return record
    experiment_id = tracking.ensure_experiment(config.experiment, uri)
    tags = {
        tracking.TAG_DATA_MANIFEST: plan_params["data_manifest_sha256"],
        tracking.TAG_IDENTITY_NET: plan_params["identity_net_sha256"],
        tracking.TAG_GIT_COMMIT: tracking.git_commit(),
        "ipsr.storage": record_uri.rsplit("/", 1)[0],
    }
    settings = config.model_dump(mode="json")
    run_id = tracking.create_run(experiment_id, config.run_name, {**settings, "plan": plan_params}, tags, uri)
    record = {
        "run_name": config.run_name,
        "config": settings,
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "plan": plan_params,
        "status": "running",
        "created": time.time(),
    }
    _write_json(storage, record_uri, record)
    return record


def _fit(config: TrainConfig, plan: Plan, dataset, storage: Storage, storage_root: str, cpus: float):
    """``TorchTrainer.fit`` with the progress bar; the MLflow run is marked failed/killed if it does not finish.
    Returns the last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, root_path = storage.resolve(storage_root)
    resources = {"CPU": cpus} | ({"GPU": 1} if config.gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "plan": plan},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=root_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
        ),
        datasets={"train": dataset},
    )
    try:
        with _step_progress(plan.mlflow_run_id, plan.tracking_uri, plan.steps_per_epoch, plan.total_steps):
            result = trainer.fit()
    except KeyboardInterrupt:
        tracking.set_run_status(plan.mlflow_run_id, "KILLED", plan.tracking_uri)
        raise
    except Exception:
        tracking.set_run_status(plan.mlflow_run_id, "FAILED", plan.tracking_uri)
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {config.run_name}: training finished without a checkpoint")
    return result.checkpoint


def _log_and_register(
    config: TrainConfig, state: dict, data: DatasetInfo, identity_sha256: str, run_id: str, uri: str
) -> str:
    """Log the final generator to the run (pt2 + signature + input example) and register it @candidate.

    Idempotent per run: a rerun after a crash between registering and finishing reuses the version.
    """
    import mlflow
    from mlflow.models import infer_signature

    tags = {
        tracking.TAG_DATA_MANIFEST: data.manifest_sha256,
        tracking.TAG_IDENTITY_NET: identity_sha256,
        tracking.TAG_GIT_COMMIT: tracking.git_commit(),
        "run_name": config.run_name,
        "steps": str(state["step"]),
        "embedding_loss": config.embedding_loss,
        "residual": str(config.residual),
        "identity_jitter": str(config.identity_jitter),
        **{k: f"{v:.4f}" for k, v in state["metrics"].items() if k.startswith("val")},
    }
    client = tracking.client(uri)
    existing = (
        client.search_model_versions(f"name='{config.register_as}' and run_id='{run_id}'")
        if client.search_registered_models(f"name='{config.register_as}'")
        else []
    )
    if existing:
        version = str(max(int(v.version) for v in existing))
        tracking.tag_version(config.register_as, version, tags, uri)
        tracking.set_alias(config.register_as, tracking.CANDIDATE, version, uri)
        return version

    generator = checkpoint.generator_from_state(state["generator"]).eval()
    # A realistic input: two val faces degraded to the first val size (batch 2 keeps the batch dim dynamic).
    example = degrade(from_uint8(torch.from_numpy(data.val_probe[:2])), parse_size(config.val_sizes[0]))
    with torch.no_grad():
        output = generator(example)
    signature = infer_signature(example.numpy(), output.numpy())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        # pt2 (torch.export): no pickle, loads without ipsr installed, and mlflow.pytorch.load_model returns a
        # module that runs batches of any size. (The pickle format would need torch.load(weights_only=False).)
        info = mlflow.pytorch.log_model(
            generator,
            name="generator",
            signature=signature,
            input_example=example.numpy(),
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return tracking.register(info.model_uri, config.register_as, alias=tracking.CANDIDATE, tags=tags, uri=uri)


def run_and_report(config: TrainConfig) -> TrainResult:
    """``ipsr train``: train, then say what was registered."""
    result = train(config)
    if result.already_finished:
        console.say(f"run {result.run_name} already finished; nothing to do")
    val = ", ".join(f"{size} {value:.3f}" for size, value in result.val_rank1.items())
    console.say(
        f"run {result.run_name}: {result.steps} steps (resumed from step {result.resumed_from_step}); "
        f"val rank-1 {val}\nregistered {result.model} version {result.model_version} as "
        f"{result.model_uri} (MLflow run {result.mlflow_run_id})"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.train [flags]``: the same command as ``ipsr train`` (generated from its config model)."""
    run_main(job_command("train", run_and_report), argv)


if __name__ == "__main__":
    main()
