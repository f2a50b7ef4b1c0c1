"""The Ray Train worker of `ipsr train`: build, restore, then steps until the plan's total, top to bottom.

Each worker streams its shard of the ``train`` split (Parquet → PNG decode in Ray Data tasks →
``iter_torch_batches``), degrades each face to a random paper size on its device and optimises
L = L_embedding + β·L_pixel with the generator in DDP and the frozen FaceNet outside it (no trainable parameters;
gradients flow through it to the generator). Rank 0 logs to MLflow (``setup_mlflow``), validates at every epoch
end and writes the checkpoints (every ``checkpoint_every`` steps and at epoch end).

Resuming is Ray Train V2's: a restarted worker group or a rerun of the same command finds the latest checkpoint
with ``ray.train.get_checkpoint()``; the loop continues at the saved step. A partly done epoch is finished with a
fresh pass over the shard (streamed data has no replayable order across workers), taking only the steps the
epoch still owes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ipsr_model import checkpoint
from ipsr_model.degradation import MultiScaleDegradation, degrade, parse_size
from ipsr_model.images import from_uint8, to_pil
from ipsr_model.losses import IdentityPreservingLoss
from ipsr_platform.config import TrainConfig

SCORE = "val_rank1"  # mean model rank-1 over the val sizes: the checkpoint score (CheckpointConfig)
NO_SCORE = -1.0  # step checkpoints carry no validation: they rank below every validated one


@dataclass
class Plan:
    """What the driver decided for every worker (typed: a misspelt field fails at once, not mid-run)."""

    steps_per_epoch: int
    total_steps: int
    threads_per_worker: int
    identity_net_sha256: str
    data_manifest_sha256: str
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    val_labels: np.ndarray  # [V] int64
    val_gallery: np.ndarray  # [V, 128, 128, 3] uint8
    val_probe: np.ndarray


# ------------------------------------------------------------------------------------------------ the loop


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker (``loop_config``: ``{"config": TrainConfig as JSON, "plan": Plan}``)."""
    import ray.train

    worker = _Worker(TrainConfig.model_validate(loop_config["config"]), loop_config["plan"])
    shard = ray.train.get_dataset_shard("train")
    while worker.step < worker.plan.total_steps:
        _epoch(worker, shard)


def _epoch(w: _Worker, shard) -> None:
    """The steps the current epoch still owes, on a fresh pass over the shard."""
    epoch, done_in_epoch = divmod(w.step, w.plan.steps_per_epoch)
    todo = min(w.plan.steps_per_epoch - done_in_epoch, w.plan.total_steps - w.step)
    batches = iter(shard.iter_torch_batches(
        batch_size=w.config.batch_size, drop_last=True, local_shuffle_buffer_size=w.config.shuffle_buffer or None,
        local_shuffle_seed=None, device=w.device,
    ))  # fmt: skip
    window = _Window(w.device)
    try:
        for _ in range(todo):
            if (batch := next(batches, None)) is None:
                raise RuntimeError(
                    f"worker {w.rank}: train shard ended after {w.step - epoch * w.plan.steps_per_epoch} "
                    f"batches of epoch {epoch + 1}, expected {w.plan.steps_per_epoch}"
                )
            window.add(w.train_step(batch))
            epoch_end = w.step % w.plan.steps_per_epoch == 0 or w.step == w.plan.total_steps
            if w.step % w.config.log_every == 0 or epoch_end:
                w.log_window(window)
            with window.pause():
                if epoch_end:
                    checkpoint_and_report(w, w.validate(epoch))
                elif w.step % w.config.checkpoint_every == 0:
                    checkpoint_and_report(w, {})
    finally:
        with contextlib.suppress(Exception):
            batches.close()  # stop this epoch's stream; the next epoch starts a fresh one


class _Window:
    """Sums of the logged quantities between two log steps, on the device: no host sync per step."""

    NAMES = (
        "loss/total",
        "loss/embedding",
        "loss/pixel",
        "grad_share/embedding",
        "grad_share/pixel",
        "batch/distinct_identities",
    )  # the last: identities per worker batch (~batch size when shards mix)

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.NAMES), device=device)
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.paused = time.perf_counter(), 0, 0.0
        self.sums.zero_()

    def add(self, values: torch.Tensor) -> None:
        self.sums += values
        self.steps += 1

    @contextlib.contextmanager
    def pause(self):
        """Validation and checkpointing inside the window are not training throughput."""
        start = time.perf_counter()
        yield
        self.paused += time.perf_counter() - start


def distinct_count(labels: torch.Tensor) -> torch.Tensor:
    """Distinct values in a 1-D tensor, as a tensor on its device (``torch.unique`` would sync with the host)."""
    ordered = labels.sort().values
    return (ordered[1:] != ordered[:-1]).sum() + 1


# ------------------------------------------------------------------------------------------------ one worker


class _Worker:
    """One worker's training state: nets, optimiser, scheduler, RNG, step; MLflow and validation on rank 0."""

    def __init__(self, config: TrainConfig, plan: Plan) -> None:
        import ray.train
        import ray.train.torch

        self.config, self.plan, self.step = config, plan, 0
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        cuda = self.device.type == "cuda"
        if not cuda:
            torch.set_num_threads(self.plan.threads_per_worker)
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.autocast_dtype = torch.bfloat16 if cuda else None
        self._build(cuda)
        self.resumed_from = self._restore()
        self.model = ray.train.torch.prepare_model(self.generator, move_to_device=False)  # DDP when world > 1
        loss_net = self.identity_net
        if self.config.compile:  # FaceNet is ~85 % of a step's FLOPs: compile it too (validation keeps it eager)
            self.model, loss_net = torch.compile(self.model), torch.compile(self.identity_net)
        self.loss_fn = IdentityPreservingLoss(
            loss_net,
            beta=self.config.beta,
            embedding_loss=self.config.embedding_loss,
            jitter=self.config.identity_jitter,
        )
        self.degradation = MultiScaleDegradation()
        self.mlflow, self.validator = self._tracking() if self.rank == 0 else (None, None)

    def _build(self, cuda: bool) -> None:
        from ipsr_model.identity import IdentityNet
        from ipsr_model.training import make_optimizer, make_scheduler
        from ipsr_model.unet import UNetGenerator

        c = self.config
        self.identity_net = IdentityNet(c.identity_weights).to(self.device, memory_format=self.memory_format)
        if self.identity_net.weights_sha256 != self.plan.identity_net_sha256:
            raise RuntimeError(
                f"worker {self.rank} loaded identity weights {self.identity_net.weights_sha256[:12]}…, the driver "
                f"{self.plan.identity_net_sha256[:12]}…: the '{c.identity_weights}' cache differs between nodes"
            )
        self.generator = UNetGenerator(c.base_channels, residual=c.residual).to(
            self.device, memory_format=self.memory_format
        )
        self.optimizer = make_optimizer(self.generator, c.lr, fused=True if cuda else None)
        self.scheduler = make_scheduler(
            self.optimizer, total_steps=self.plan.total_steps, warmup_steps=c.lr_warmup_steps, schedule=c.lr_schedule
        )
        # CPU generator even on a GPU: the degradation draws only steer which rows get which size, and drawing them
        # on the GPU would cost a device->host sync every step.
        self.degrade_rng = torch.Generator()

    def _restore(self) -> int:
        """Continue from Ray Train's latest checkpoint, if any; returns the step resumed from."""
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            self._seed(0)
            return 0
        with latest.as_directory() as directory:
            state = checkpoint.load(directory)
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            _set_rng_state(rngs[self.rank], self.device, self.degrade_rng)
        else:  # another number of workers: a fresh, still deterministic stream per rank
            self._seed(self.step)
        return self.step

    def _seed(self, step: int) -> None:
        value = (self.config.seed * 1_000_003 + step) * 4099 + self.rank
        torch.manual_seed(value)
        self.degrade_rng.manual_seed(value + 1)

    def _tracking(self):
        """Rank 0: the driver's MLflow run (``setup_mlflow`` resumes it) and the validator."""
        from ray.air.integrations.mlflow import setup_mlflow

        os.environ["MLFLOW_RUN_ID"] = self.plan.mlflow_run_id
        mlflow = setup_mlflow(
            tracking_uri=self.plan.tracking_uri,
            registry_uri=self.plan.tracking_uri,
            experiment_id=self.plan.experiment_id,
        )
        mlflow.set_tag("ipsr.attempt_resumed_from_step", str(self.resumed_from))
        validator = _Validator(self.config, self.plan, self.identity_net, self.device)
        if self.step == 0:  # the bicubic baseline does not change: once per run
            bicubic = validator.rank1(restore=None)
            mlflow.log_metrics({f"val/rank1/bicubic/{k}": v for k, v in bicubic.items()}, step=0)
        return mlflow, validator

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimiser step; returns this step's logged quantities (``_Window.NAMES``) as one device tensor."""
        from ipsr_model.training import grad_shares, training_step

        stats = training_step(
            self.model, self.loss_fn, self.optimizer, from_uint8(batch["hr"], self.memory_format), self.degradation,
            self.degrade_rng, autocast_dtype=self.autocast_dtype, scheduler=self.scheduler,
            hr_embedding=batch.get("hr_embedding"),  # a column only when the driver chose precomputed (train_dataset)
        )  # fmt: skip
        self.step += 1
        shares = grad_shares(stats.grad_embedding, stats.grad_pixel)
        return torch.stack([stats.total, stats.embedding, stats.pixel, *shares, distinct_count(batch["label"])]).float()

    def log_window(self, window: _Window) -> None:
        """Means over the window and over workers (a collective: every rank calls it); rank 0 logs them."""
        means = window.sums.double() / window.steps
        if _distributed():
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        means = means.tolist()  # a host sync: the elapsed time below includes the window's device work
        elapsed = time.perf_counter() - window.start - window.paused
        if self.mlflow is not None:
            self.mlflow.log_metrics(dict(zip(_Window.NAMES, means)) | {
                "lr": self.scheduler.get_last_lr()[0],
                "throughput/img_per_s": self.world * self.config.batch_size * window.steps / elapsed,
                "epoch": self.step / self.plan.steps_per_epoch,
            }, step=self.step)  # fmt: skip
        window.reset()

    def validate(self, epoch: int) -> dict[str, float]:
        """Rank 0 at an epoch end: rank-1 per val size and the PNG grid to MLflow; the metrics to report."""
        if self.rank != 0:
            return {}
        self.generator.eval()
        scores = self.validator.rank1(restore=self.generator)
        grid = self.validator.grid(self.generator)
        self.generator.train()
        metrics = {SCORE: float(np.mean([v for k, v in scores.items() if k != "HR"]))}
        metrics |= {f"val/{k}": v for k, v in scores.items()}
        self.mlflow.log_metrics(
            {f"val/rank1/{'HR' if k == 'HR' else 'model/' + k}": v for k, v in scores.items()}
            | {"val/rank1_mean": metrics[SCORE]},
            step=self.step,
        )
        self.mlflow.log_image(grid, artifact_file=f"grids/step{self.step:07d}_epoch{epoch + 1:03d}.png")
        return metrics


def checkpoint_and_report(w: _Worker, metrics: dict[str, float]) -> None:
    """Every rank calls this at the same steps (the gather and ``ray.train.report`` are collectives); rank 0
    writes the state (weights, optimiser, scheduler, every rank's RNG) as the checkpoint."""
    import ray.train

    states = [_rng_state(w.device, w.degrade_rng)]
    if _distributed():
        states = [None] * w.world
        torch.distributed.all_gather_object(states, _rng_state(w.device, w.degrade_rng))
    reported = {
        "step": w.step,
        "epoch": w.step / w.plan.steps_per_epoch,
        "resumed_from_step": w.resumed_from,
        SCORE: NO_SCORE,
        **metrics,
    }
    name = f"checkpoint_step{w.step:09d}"
    if w.rank != 0:
        ray.train.report(reported, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="ipsr-ckpt-", ignore_cleanup_errors=True) as directory:
        checkpoint.save(directory, {
            "generator": checkpoint.cpu_state_dict(w.generator),
            "optimizer": w.optimizer.state_dict(),
            "scheduler": w.scheduler.state_dict(),
            "step": w.step,
            "epoch": w.step // w.plan.steps_per_epoch,
            "steps_per_epoch": w.plan.steps_per_epoch,
            "rng": [{k: v.cpu() for k, v in s.items()} for s in states],
            "config": w.config.model_dump(mode="json"),
            "metrics": {k: float(v) for k, v in reported.items()},
            "identity_net_sha256": w.plan.identity_net_sha256,
            "data_manifest_sha256": w.plan.data_manifest_sha256,
        })  # fmt: skip
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)


# ------------------------------------------------------------------------------------------------ helpers


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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _Validator:
    """AR-style rank-1 on the val pairs (rank 0): model and bicubic at each size, plus the PNG grid."""

    def __init__(self, config: TrainConfig, plan: Plan, identity_net: torch.nn.Module, device: torch.device):
        self.identity_net = identity_net
        self.sizes = tuple(parse_size(s) for s in config.val_sizes)
        self.labels = torch.tensor(plan.val_labels)
        self.gallery = from_uint8(torch.tensor(plan.val_gallery)).to(device)
        self.probe = from_uint8(torch.tensor(plan.val_probe)).to(device)
        self.grid_faces = self.probe[: config.grid_faces]

    def rank1(self, restore: torch.nn.Module | None) -> dict[str, float]:
        from ipsr_platform.scoring import rank1_by_size

        return rank1_by_size(self.identity_net, self.gallery, self.probe, self.labels, self.sizes, restore=restore)

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
        return to_pil(grid[None])[0]
