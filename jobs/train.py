"""`ipsr train`: the IPU-Net U-Net on a preprocessed face dataset, with Ray Train + Ray Data + MLflow.

Driver (``train(config)``)
    checks the dataset (``_SUCCESS``, shards, columns), picks the AR-style validation pairs (first two images of
    each val identity: gallery, probe), sizes the run (steps per epoch = train rows // workers // batch), opens or
    resumes the MLflow run recorded in ``<storage>/<run-name>/ipsr_run.json``, runs a ``TorchTrainer``, then logs
    the final generator to MLflow (``pt2``) and registers it (alias ``candidate`` + provenance tags).

Workers (``_train_loop``)
    stream their shard of the ``train`` split (Parquet → PNG decode in Ray Data tasks → ``iter_torch_batches``),
    degrade each face to a random paper size on the worker's device, and optimise L = L_embedding + β·L_pixel
    with the generator in DDP and the frozen FaceNet outside it (it has no trainable parameters; gradients flow
    through it to the generator). Rank 0 logs to MLflow (``setup_mlflow``), validates at every epoch end and
    writes the checkpoints (every ``checkpoint_every`` steps and at epoch end).

Resuming is Ray Train V2's: a restarted worker group (``FailureConfig.max_failures``) or a rerun of the same
command (same ``storage`` + ``run_name``) finds the latest checkpoint with ``ray.train.get_checkpoint()``; the loop
continues at the saved step, so the total step count is the same as an uninterrupted run. A partly done epoch is
finished with a fresh pass over the shard (streamed data has no replayable order across workers), taking only the
steps the epoch still owes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipsr_model.degradation import MultiScaleDegradation, degrade, parse_size
from ipsr_model.errors import UserError
from ipsr_model.losses import IdentityPreservingLoss
from ipsr_platform import cluster, console
from ipsr_platform.config import TrainConfig
from ipsr_platform.storage import Storage, join, normalize
from jobs.train_data import decode_batch, decode_faces

log = logging.getLogger(__name__)

RUN_RECORD = "ipsr_run.json"
STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = 2  # 2: + the learning-rate scheduler state
SCORE = "val_rank1"  # mean model rank-1 over the val sizes: the checkpoint score (CheckpointConfig)
NO_SCORE = -1.0  # step checkpoints carry no validation: they rank below every validated one
REQUIRED_COLUMNS = ("image", "identity", "label", "split", "source")
# Settings a rerun may change; any other difference would make "resume" train a different model.
RESUMABLE_FIELDS = frozenset(
    {"max_failures", "cpus_per_worker", "log_every", "compile", "register_as", "checkpoint_every", "keep_checkpoints", "grid_faces"}
)


# ------------------------------------------------------------------------------------------------ the dataset


def to_images(hr_uint8: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 NHWC (on any device) → float32 NCHW in [-1, 1] (ipsr's convention)."""
    images = hr_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return images.contiguous(memory_format=memory_format)


@dataclass
class DatasetInfo:
    uri: str
    shards: list[str]  # paths inside `filesystem` holding the train split (only it, in the per-split layout)
    filesystem: Any
    manifest_sha256: str
    n_train: int
    val_identities: list[str]
    val_labels: np.ndarray  # [V] int64
    val_gallery: np.ndarray  # [V, 128, 128, 3] uint8: first image of each val identity
    val_probe: np.ndarray  # second image
    hr_embeddings_sha256: str | None = None  # identity net that made the dataset's hr_embedding column, if any
    mixed: bool = True  # False: an identity-sorted dataset from an older preprocess (few identities per batch)


def inspect_dataset(config: TrainConfig, storage: Storage) -> DatasetInfo:
    """Check the preprocess output and pick what the driver needs; every problem is one UserError line."""
    import pyarrow.compute as pc

    uri = normalize(config.data)
    manifest, files, embedded = _read_manifest(uri, storage)
    fs, _ = storage.resolve(uri)
    by_split = _shards_by_split(uri, files, storage)
    train, val = _open_shards(uri, fs, by_split, "train"), _open_shards(uri, fs, by_split, "val")
    # Only the split column is scanned to count; only val rows are materialised (no pixels) to pick pairs.
    n_train = train.count_rows(filter=pc.field("split") == "train")
    gallery, probe, pairs = _val_pairs(uri, val, config.val_identities)
    return DatasetInfo(
        uri=uri,
        shards=by_split.get("train", by_split.get(None, [])),
        filesystem=fs,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        n_train=n_train,
        val_identities=[p[1] for p in pairs],
        val_labels=np.array([p[0] for p in pairs], dtype=np.int64),
        val_gallery=gallery,
        val_probe=probe,
        hr_embeddings_sha256=embedded if "hr_embedding" in train.schema.names else None,
        mixed=None not in by_split,
    )


def _read_manifest(uri: str, storage: Storage) -> tuple[bytes, list[dict] | None, str | None]:
    """(manifest.json's bytes, its shard list, the sha256 of the net behind its hr_embedding column)."""
    if not storage.exists(join(uri, "_SUCCESS")):
        if not storage.exists(uri):
            raise UserError(f"--data {uri}: no such dataset")
        raise UserError(
            f"--data {uri} has no _SUCCESS marker: not a finished `ipsr preprocess` output (still running, or "
            "interrupted? rerun preprocess)"
        )
    try:
        manifest = storage.read_bytes(join(uri, "manifest.json"))
    except UserError:
        raise UserError(f"--data {uri}: manifest.json is missing (not an `ipsr preprocess` output?)") from None
    try:
        parsed = json.loads(manifest)
        return manifest, parsed.get("files"), (parsed.get("hr_embeddings") or {}).get("identity_net_sha256")
    except (ValueError, AttributeError):
        raise UserError(f"--data {uri}: manifest.json is not a JSON object") from None


def _shards_by_split(uri: str, files: list[dict] | None, storage: Storage) -> dict[str | None, list[str]]:
    """split → shard paths; key None for shards holding every split (older preprocess, or written by other means)."""
    out: dict[str | None, list[str]] = {}
    if files:  # the committed shards, as the preprocess job lists them
        for f in files:
            out.setdefault(f.get("split"), []).append(storage.resolve(join(uri, f["path"]))[1])
    else:  # a dataset written by other means: every Parquet file except rejects and hidden/temporary ones
        out[None] = [
            storage.resolve(info.path)[1]
            for info in storage.list(uri, recursive=True)
            if info.is_file
            and info.path.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in info.path[len(uri) :].split("/"))
            and Path(info.path).name != "rejects.parquet"
        ]
    if not any(out.values()):
        raise UserError(f"--data {uri}: no Parquet shards besides rejects.parquet")
    return {k: sorted(v) for k, v in out.items()}


def _open_shards(uri: str, fs: Any, by_split: dict[str | None, list[str]], split: str):
    """A pyarrow dataset over the shards that can hold ``split`` (filter rows by the split column still)."""
    import pyarrow.dataset as pads

    shards = by_split.get(split, []) + by_split.get(None, [])
    if not shards:
        if split == "val":
            return None  # answered below with what validation needs
        raise UserError(f"--data {uri}: the {split} split is empty")
    try:
        dataset = pads.dataset(shards, filesystem=fs, format="parquet")
    except (OSError, ValueError) as err:
        raise UserError(f"--data {uri}: unreadable shards ({str(err).splitlines()[0]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise UserError(f"--data {uri}: shards lack column(s) {', '.join(missing)}")
    return dataset


def _val_pairs(uri: str, val, limit: int) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Gallery and probe faces (uint8) of up to ``limit`` val identities with >= 2 faces, and the chosen
    (label, identity, gallery source, probe source) tuples; deterministic (sorted by label, then source)."""
    import pyarrow.compute as pc

    rows = [] if val is None else val.to_table(columns=["identity", "label", "source"],
                                                filter=pc.field("split") == "val").to_pylist()
    by_identity: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        by_identity.setdefault(row["identity"], []).append((row["source"], int(row["label"])))
    pairs = sorted(
        ((r[0][1], name, r[0][0], r[1][0]) for name, r in ((n, sorted(r)) for n, r in by_identity.items())
         if len(r) >= 2)
    )[:limit]  # fmt: skip
    if len(pairs) < 2:
        raise UserError(
            f"--data {uri}: the val split has {len(pairs)} identities with >= 2 faces; validation (one gallery + one "
            "probe face per identity) needs at least 2 — preprocess with a larger val fraction"
        )
    # Only the few chosen faces' pixels are read (the val split is small; its own folder in the current layout).
    wanted = [p[2] for p in pairs] + [p[3] for p in pairs]
    chosen = pc.field("identity").isin([p[1] for p in pairs]) & pc.field("source").isin(wanted)
    table = val.to_table(columns=["source", "image"], filter=chosen)
    blob = dict(zip(table.column("source").to_pylist(), table.column("image").to_pylist()))
    try:
        return decode_faces([blob[p[2]] for p in pairs]), decode_faces([blob[p[3]] for p in pairs]), pairs
    except (OSError, ValueError) as err:
        raise UserError(f"--data {uri}: unreadable val face ({err})") from None


def hr_embeddings_use(config: TrainConfig, data: DatasetInfo, identity_sha256: str) -> tuple[bool, str]:
    """Whether the step takes the HR embeddings from the dataset (skipping FaceNet's HR forward) and why."""
    if config.embedding_loss == "none":
        return False, "not used (--embedding-loss none)"
    if data.hr_embeddings_sha256 is None:
        return False, "computed each step (the dataset has none: `ipsr preprocess --hr-embeddings WEIGHTS`)"
    if data.hr_embeddings_sha256 != identity_sha256:
        return False, "computed each step (the dataset's were made with other FaceNet weights)"
    if config.identity_jitter:
        return False, "computed each step (--identity-jitter > 0 embeds a new random view of every HR face)"
    return True, "precomputed (the dataset's hr_embedding column, same FaceNet weights)"


def train_dataset(data: DatasetInfo, embeddings: bool = False):
    """The ``train`` split as a Ray Dataset of decoded faces (column ``hr``: uint8 128×128×3, ``label``: int32;
    with ``embeddings`` also ``hr_embedding``: float32 [512])."""
    import ray.data
    from ray.data.expressions import col

    ds = ray.data.read_parquet(data.shards, filesystem=data.filesystem, shuffle="files")
    columns = ["image", "label", "split"] + ["hr_embedding"] * embeddings
    ds = ds.select_columns(columns).filter(expr=col("split") == "train")
    # Decoding is CPU work in Ray Data tasks, beside the training workers, never in their step.
    return ds.map_batches(decode_batch, batch_format="numpy", batch_size=128, fn_kwargs={"embeddings": embeddings})


# ------------------------------------------------------------------------------------------- worker side


def distinct_count(labels: torch.Tensor) -> torch.Tensor:
    """Distinct values in a 1-D tensor, as a tensor on its device (``torch.unique`` would sync with the host)."""
    ordered = labels.sort().values
    return (ordered[1:] != ordered[:-1]).sum() + 1


def _rng_state(device: torch.device, degrade_rng: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "degrade": degrade_rng.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device, degrade_rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    degrade_rng.set_state(state["degrade"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed(seed: int, rank: int, step: int, device: torch.device, degrade_rng: torch.Generator) -> None:
    value = (seed * 1_000_003 + step) * 4099 + rank
    torch.manual_seed(value)
    degrade_rng.manual_seed(value + 1)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mean_over_workers(sums: torch.Tensor, steps: int) -> list[float]:
    """Per-step means of the summed loss terms, averaged over all workers (a collective: every rank calls it)."""
    means = sums.double() / steps
    if _distributed():
        torch.distributed.all_reduce(means)
        means /= torch.distributed.get_world_size()
    return means.tolist()


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict's tensors on the CPU; ``_extra_state`` (e.g. the U-Net's residual flag) is kept as it is."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's training state (weights_only load)."""
    state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {checkpoint_dir}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


class _Validator:
    """AR-style rank-1 on the val pairs (rank 0): model and bicubic at each size, plus the PNG grid."""

    def __init__(self, plan: dict, identity_net: torch.nn.Module, device: torch.device):
        self.identity_net = identity_net
        self.sizes = tuple(parse_size(s) for s in plan["val_sizes"])
        self.labels = torch.tensor(plan["val_labels"])
        self.gallery = to_images(torch.tensor(plan["val_gallery"])).to(device)
        self.probe = to_images(torch.tensor(plan["val_probe"])).to(device)
        self.grid_faces = self.probe[: plan["grid_faces"]]

    def rank1(self, restore: torch.nn.Module | None) -> dict[str, float]:
        from ipsr_model.metrics import degraded_rank1

        return degraded_rank1(
            self.identity_net, self.gallery, self.labels, self.probe, self.labels, self.sizes, restore=restore
        )

    @torch.no_grad()
    def grid(self, generator: torch.nn.Module) -> Image.Image:
        """Rows: each grid face at each size; columns: LR (bicubic) | SR | HR."""
        from torchvision.utils import make_grid

        tiles = []
        for size in self.sizes:
            low = degrade(self.grid_faces, size)
            sr = generator(low)
            for i in range(len(self.grid_faces)):
                tiles += [low[i], sr[i], self.grid_faces[i]]
        grid = make_grid(torch.stack(tiles).float().cpu().clamp(-1, 1), nrow=3, padding=2, pad_value=1.0)
        pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(pixels)


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.air.integrations.mlflow import setup_mlflow

    from ipsr_model.identity import IdentityNet
    from ipsr_model.training import grad_shares, make_optimizer, make_scheduler, training_step
    from ipsr_model.unet import UNetGenerator

    config = TrainConfig.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(plan["threads_per_worker"])
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    autocast_dtype = torch.bfloat16 if cuda else None

    identity_net = IdentityNet(config.identity_weights).to(device, memory_format=memory_format)
    if identity_net.weights_sha256 != plan["identity_net_sha256"]:
        raise RuntimeError(
            f"worker {rank} loaded identity weights {identity_net.weights_sha256[:12]}…, the driver "
            f"{plan['identity_net_sha256'][:12]}…: the '{config.identity_weights}' cache differs between nodes"
        )
    generator = UNetGenerator(config.base_channels, residual=config.residual).to(device, memory_format=memory_format)
    optimizer = make_optimizer(generator, config.lr, fused=True if cuda else None)
    scheduler = make_scheduler(
        optimizer, total_steps=plan["total_steps"], warmup_steps=config.lr_warmup_steps, schedule=config.lr_schedule
    )
    # CPU generator even on a GPU: the degradation draws only steer which rows get which size, and drawing them on
    # the GPU would cost a device->host sync every step.
    degrade_rng = torch.Generator()

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank], device, degrade_rng)
        else:
            _seed(config.seed, rank, step, device, degrade_rng)
    else:
        _seed(config.seed, rank, 0, device, degrade_rng)
    resumed_from = step

    model = ray.train.torch.prepare_model(generator, move_to_device=False)  # DDP over workers when world > 1
    loss_net = identity_net
    if config.compile:  # FaceNet is ~85 % of a step's FLOPs: compile it too (the validator keeps the eager one)
        model, loss_net = torch.compile(model), torch.compile(identity_net)
    loss_fn = IdentityPreservingLoss(
        loss_net, beta=config.beta, embedding_loss=config.embedding_loss, jitter=config.identity_jitter
    )
    degradation = MultiScaleDegradation()
    steps_per_epoch, total_steps = plan["steps_per_epoch"], plan["total_steps"]

    mlflow = None
    validator = None
    if rank == 0:
        os.environ["MLFLOW_RUN_ID"] = plan["mlflow_run_id"]  # setup_mlflow resumes the driver's run
        mlflow = setup_mlflow(
            tracking_uri=plan["tracking_uri"], registry_uri=plan["tracking_uri"], experiment_id=plan["experiment_id"]
        )
        mlflow.set_tag("ipsr.attempt_resumed_from_step", str(resumed_from))
        validator = _Validator(plan, identity_net, device)
        if step == 0:  # the bicubic baseline does not change: once per run
            bicubic = validator.rank1(restore=None)
            mlflow.log_metrics({f"val/rank1/bicubic/{k}": v for k, v in bicubic.items()}, step=step)

    def checkpoint_and_report(metrics: dict[str, float]) -> None:
        # Every rank calls this at the same steps: the gather and ray.train.report are collectives.
        states = [_rng_state(device, degrade_rng)]
        if _distributed():
            states = [None] * world
            torch.distributed.all_gather_object(states, _rng_state(device, degrade_rng))
        epochs_done = step / steps_per_epoch
        reported = {"step": step, "epoch": epochs_done, "resumed_from_step": resumed_from, SCORE: NO_SCORE, **metrics}
        if rank != 0:
            ray.train.report(reported, checkpoint=None, checkpoint_dir_name=f"checkpoint_step{step:09d}")
            return
        directory = tempfile.mkdtemp(prefix="ipsr-ckpt-")
        try:
            torch.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "generator": _to_cpu(generator.state_dict()),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "steps_per_epoch": steps_per_epoch,
                    "rng": [{k: v.cpu() for k, v in s.items()} for s in states],
                    "config": config.model_dump(mode="json"),
                    "metrics": {k: float(v) for k, v in reported.items()},
                    "identity_net_sha256": plan["identity_net_sha256"],
                    "data_manifest_sha256": plan["data_manifest_sha256"],
                },
                Path(directory) / STATE_FILE,
            )
            ray.train.report(
                reported,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint_step{step:09d}",
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    shard = ray.train.get_dataset_shard("train")
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        todo = min(steps_per_epoch - done_in_epoch, total_steps - step)
        batches = iter(
            shard.iter_torch_batches(
                batch_size=config.batch_size,
                drop_last=True,
                local_shuffle_buffer_size=config.shuffle_buffer or None,
                local_shuffle_seed=None,
                device=device,
            )
        )
        # Loss sums stay on the device between log steps: no host sync per step.
        window_start, window_steps, window_sums = time.perf_counter(), 0, torch.zeros(6, device=device)
        paused = 0.0  # seconds of validation and checkpointing inside the window: not training throughput
        try:
            for _ in range(todo):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise RuntimeError(
                        f"worker {rank}: train shard ended after {step - epoch * steps_per_epoch} batches of epoch "
                        f"{epoch + 1}, expected {steps_per_epoch}"
                    ) from None
                hr = to_images(batch["hr"], memory_format)
                stats = training_step(
                    model, loss_fn, optimizer, hr, degradation, degrade_rng, autocast_dtype=autocast_dtype,
                    hr_embedding=batch["hr_embedding"] if plan["hr_embeddings"] == "precomputed" else None,
                    scheduler=scheduler,
                )  # fmt: skip
                step += 1
                window_steps += 1
                shares = grad_shares(stats.grad_embedding, stats.grad_pixel)
                distinct = distinct_count(batch["label"])
                window_sums += torch.stack([stats.total, stats.embedding, stats.pixel, *shares, distinct]).float()
                epoch_end = step % steps_per_epoch == 0 or step == total_steps
                if step % config.log_every == 0 or epoch_end:
                    means = _mean_over_workers(window_sums, window_steps)
                    elapsed = time.perf_counter() - window_start - paused
                    if mlflow is not None:
                        mlflow.log_metrics(
                            {
                                "loss/total": means[0],
                                "loss/embedding": means[1],
                                "loss/pixel": means[2],
                                # share of the gradient entering the generator that each term contributes
                                "grad_share/embedding": means[3],
                                "grad_share/pixel": means[4],
                                # identities per worker batch: ~batch size when shards mix identities
                                "batch/distinct_identities": means[5],
                                "lr": scheduler.get_last_lr()[0],
                                "throughput/img_per_s": world * config.batch_size * window_steps / elapsed,
                                "epoch": step / steps_per_epoch,
                            },
                            step=step,
                        )
                    window_start, window_steps, paused = time.perf_counter(), 0, 0.0
                    window_sums.zero_()
                pause_start = time.perf_counter()
                if epoch_end:
                    metrics: dict[str, float] = {}
                    if rank == 0:
                        generator.eval()
                        scores = validator.rank1(restore=generator)
                        grid = validator.grid(generator)
                        generator.train()
                        model_sizes = [v for k, v in scores.items() if k != "HR"]
                        metrics = {SCORE: float(np.mean(model_sizes)), **{f"val/{k}": v for k, v in scores.items()}}
                        mlflow.log_metrics(
                            {
                                f"val/rank1/{'HR' if k == 'HR' else 'model/' + k}": v for k, v in scores.items()
                            } | {"val/rank1_mean": metrics[SCORE]},
                            step=step,
                        )
                        mlflow.log_image(grid, artifact_file=f"grids/step{step:07d}_epoch{epoch + 1:03d}.png")
                    checkpoint_and_report(metrics)
                elif step % config.checkpoint_every == 0:
                    checkpoint_and_report({})
                paused += time.perf_counter() - pause_start
        finally:
            with contextlib.suppress(Exception):
                batches.close()  # stop this epoch's stream; the next epoch starts a fresh one


# ------------------------------------------------------------------------------------------- driver side


@contextlib.contextmanager
def _step_progress(run_id: str, uri: str, steps_per_epoch: int, total_steps: int):
    """A progress bar of optimiser steps while ``trainer.fit()`` blocks: rank 0 logs ``epoch`` to MLflow every
    ``log_every`` steps, and a thread reads it back every 2 s (one small registry call; stops with the fit)."""
    from ipsr_platform import console, tracking

    stop = threading.Event()
    with console.progress("train", total_steps, "steps") as advance:
        def follow() -> None:
            shown = 0
            while not stop.wait(2.0):
                with contextlib.suppress(Exception):  # the tracking server may blink; the bar can wait
                    epoch = tracking.client(uri).get_run(run_id).data.metrics.get("epoch", 0.0)
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


def _cluster_cpus_gpus() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


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
    """Atomic where the filesystem allows (local: write + rename; S3: one PUT is atomic anyway)."""
    storage.write_bytes(uri + ".tmp", json.dumps(obj, indent=2, sort_keys=True).encode())
    storage.move(uri + ".tmp", uri)


def _resume_conflicts(saved: dict, config: TrainConfig) -> list[str]:
    now = config.model_dump(mode="json")
    return [
        f"{name} {saved.get(name)!r} -> {now.get(name)!r}"
        for name in sorted(set(saved) | set(now))
        if name not in RESUMABLE_FIELDS and saved.get(name) != now.get(name)
    ]


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training job described by ``config``; returns a summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ipsr_model.weights import ipsr_home, load_identity_weights
    from ipsr_platform import tracking

    storage = Storage.from_env()
    data = inspect_dataset(config, storage)
    _, identity_sha256 = load_identity_weights(config.identity_weights)  # fails here, not in every worker
    uri = tracking.tracking_uri()

    storage_root = normalize(config.storage or str(ipsr_home() / "runs"))
    run_dir = join(storage_root, config.run_name)
    record_uri = join(run_dir, RUN_RECORD)
    record = json.loads(storage.read_bytes(record_uri)) if storage.exists(record_uri) else None
    if record is not None:
        conflicts = _resume_conflicts(record["config"], config)
        if conflicts:
            raise UserError(
                f"run {config.run_name!r} in {storage_root} was started with other settings ({'; '.join(conflicts)}); "
                "rerun it with the same settings to resume, or pick a new --run-name"
            )
        if record["tracking_uri"] != uri:
            raise UserError(
                f"run {config.run_name!r} logs to MLflow at {record['tracking_uri']}, but the tracking URI is now "
                f"{uri}; set MLFLOW_TRACKING_URI back to resume it"
            )
        if record.get("status") == "finished":
            log.info("run %s already finished: %s", config.run_name, record["summary"])
            return {**record["summary"], "already_finished": True}
        if not tracking.run_exists(record["mlflow_run_id"], uri):
            raise UserError(
                f"run {config.run_name!r} points at MLflow run {record['mlflow_run_id']}, which {uri} does not have"
            )
    if data.n_train == 0:
        raise UserError(f"--data {data.uri}: the train split is empty")
    use_embeddings, why = hr_embeddings_use(config, data, identity_sha256)
    console.say(f"HR embeddings: {why}")
    if not data.mixed:
        console.say(f"warning: {data.uri} holds every split in identity-sorted shards (an older `ipsr preprocess`): "
                    "batches will hold few identities; rerun preprocess with --overwrite to mix them")

    cluster.connect()
    cluster_cpus, cluster_gpus = _cluster_cpus_gpus()
    cpus = cpus_per_worker(config, cluster_cpus)
    if cpus * config.num_workers > cluster_cpus:
        raise UserError(
            f"{config.num_workers} workers x {cpus:g} CPUs exceed the cluster's {cluster_cpus:g} CPUs "
            "(lower --num-workers or --cpus-per-worker)"
        )
    if config.gpu and cluster_gpus < config.num_workers:
        raise UserError(f"--gpu with {config.num_workers} workers needs {config.num_workers} GPUs; the cluster has {cluster_gpus:g}")
    steps_per_epoch = data.n_train // config.num_workers // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"--data {data.uri}: {data.n_train} train faces are fewer than --num-workers x --batch-size "
            f"({config.num_workers} x {config.batch_size})"
        )
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch

    plan_params = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "train_faces": data.n_train,
        "val_identities": len(data.val_identities),
        "cpus_per_worker": cpus,
        "data_manifest_sha256": data.manifest_sha256,
        "identity_net_sha256": identity_sha256,
        "hr_embeddings": "precomputed" if use_embeddings else "computed",
    }
    if record is None:
        experiment_id = tracking.ensure_experiment(config.experiment, uri)
        tags = {
            tracking.TAG_DATA_MANIFEST: data.manifest_sha256,
            tracking.TAG_IDENTITY_NET: identity_sha256,
            tracking.TAG_GIT_COMMIT: tracking.git_commit(),
            "ipsr.storage": run_dir,
        }
        run_id = tracking.create_run(
            experiment_id, config.run_name, {**config.model_dump(mode="json"), "plan": plan_params}, tags, uri
        )
        record = {
            "run_name": config.run_name,
            "config": config.model_dump(mode="json"),
            "mlflow_run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": uri,
            "plan": plan_params,
            "status": "running",
            "created": time.time(),
        }
        _write_json(storage, record_uri, record)
    else:  # resuming: the same steps must mean the same thing
        changed = [
            f"{key} {record['plan'].get(key)!r} -> {plan_params[key]!r}"
            for key in ("steps_per_epoch", "total_steps", "data_manifest_sha256", "identity_net_sha256")
            if record.get("plan", {}).get(key) != plan_params[key]
        ]
        if changed:
            raise UserError(
                f"run {config.run_name!r} cannot resume: its dataset, identity weights or cluster changed since it "
                f"started ({'; '.join(changed)}); pick a new --run-name"
            )
    run_id, experiment_id = record["mlflow_run_id"], record["experiment_id"]

    plan = {
        **plan_params,
        "threads_per_worker": max(1, int(cpus)),
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "val_sizes": list(config.val_sizes),
        "val_labels": data.val_labels,
        "val_gallery": data.val_gallery,
        "val_probe": data.val_probe,
        "grid_faces": min(config.grid_faces, len(data.val_labels)),
    }
    fs, root_path = storage.resolve(storage_root)
    resources = {"CPU": cpus} | ({"GPU": 1} if config.gpu else {})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "plan": plan},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=root_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
        ),
        datasets={"train": train_dataset(data, use_embeddings)},
    )
    try:
        with _step_progress(run_id, uri, steps_per_epoch, total_steps):
            result = trainer.fit()
    except KeyboardInterrupt:
        tracking.set_run_status(run_id, "KILLED", uri)
        raise
    except Exception:
        tracking.set_run_status(run_id, "FAILED", uri)
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {config.run_name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_state(directory)
    if state["step"] != total_steps:
        raise RuntimeError(f"run {config.run_name}: last checkpoint is at step {state['step']}, expected {total_steps}")

    version = _log_and_register(config, state, data, identity_sha256, run_id, uri)
    summary = {
        "run_name": config.run_name,
        "mlflow_run_id": run_id,
        "model": config.register_as,
        "model_version": version,
        "model_uri": f"models:/{config.register_as}@{tracking.CANDIDATE}",
        "steps": int(state["step"]),
        "resumed_from_step": int(state["metrics"].get("resumed_from_step", 0)),
        "checkpoint": join(run_dir, Path(result.checkpoint.path).name),
        "val_rank1": {k.removeprefix("val/"): v for k, v in state["metrics"].items() if k.startswith("val/")}
        | {"mean": state["metrics"][SCORE]},
    }
    tracking.set_run_status(run_id, "FINISHED", uri)
    _write_json(storage, record_uri, {**record, "status": "finished", "summary": summary})
    return summary


def _log_and_register(
    config: TrainConfig, state: dict, data: DatasetInfo, identity_sha256: str, run_id: str, uri: str
) -> str:
    """Log the final generator to the run (pt2 + signature + input example) and register it @candidate.

    Idempotent per run: a rerun after a crash between registering and finishing reuses the version.
    """
    import mlflow
    from mlflow.models import infer_signature

    from ipsr_model.unet import UNetGenerator
    from ipsr_platform import tracking

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
    existing = [
        v for v in client.search_model_versions(f"name='{config.register_as}' and run_id='{run_id}'")
    ] if client.search_registered_models(f"name='{config.register_as}'") else []  # fmt: skip
    if existing:
        version = str(max(int(v.version) for v in existing))
        tracking.tag_version(config.register_as, version, tags, uri)
        tracking.set_alias(config.register_as, tracking.CANDIDATE, version, uri)
        return version

    generator = UNetGenerator(config.base_channels, residual=config.residual)
    generator.load_state_dict(state["generator"])
    generator.eval()
    # A realistic input: two val faces degraded to the first val size (batch 2 keeps the batch dim dynamic).
    example = degrade(to_images(torch.from_numpy(data.val_probe[:2])), parse_size(config.val_sizes[0]))
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


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.train [flags]``: the same flags as ``ipsr train``."""
    from ipsr_platform import cli

    sys.argv = ["ipsr", "train", *(sys.argv[1:] if argv is None else argv)]
    cli.main()


if __name__ == "__main__":
    main()
