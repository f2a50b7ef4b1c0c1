"""Training throughput of `ipsr train`'s step fed by Ray Data streaming vs. the same step fed from memory.

    python bench/train.py                  # CPU (this 2-core box): 1 worker, width 16, batch 16
    python bench/train.py --gpu            # H100: 1 GPU worker, width 64, bf16, batch 256 (target >= 2,500 img/s)
    python bench/train.py --flops-only     # FLOPs per sample (U-Net, FaceNet, one training step)

Both sources run in the same Ray Train worker, in one process run, with the same ``ipsr_model.training.training_step``
(per-sample multi-scale degradation on the worker's device, U-Net, frozen FaceNet loss, Adam), the same
uint8 → device → float conversion (``ipsr_model.images.from_uint8``) and the same DDP-prepared model:

- **memory**: the faces, decoded once into a uint8 host tensor before timing; each step takes a random batch.
- **stream**: ``jobs.train_data.train_dataset`` — Parquet → PNG decode in Ray Data tasks → ``streaming_split`` →
  ``iter_torch_batches`` — exactly what the job streams.

The two alternate in rounds (memory, stream, memory, stream, …), each with untimed warm-up steps, so that
load from other processes on a shared machine hits both alike; the reported rate is the median over rounds. The
dataset is the preprocess schema (PNG 128×128, ``split`` = train) written from the ORL faces in ../shared/data
(or synthetic faces when absent), repeated so one epoch outlasts the timed steps: an epoch restart (pipeline
start-up, ~1-3 s) is a per-epoch cost that a VGGFace2-sized epoch amortises, not a per-step one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------- the dataset


def face_pngs(count_hint: int = 400) -> list[bytes]:
    """128×128 RGB PNGs: the ORL faces (square-cropped like the smoke run), else smooth synthetic faces."""
    from PIL import Image, ImageDraw

    from ipsr_model.images import square_face

    pngs = []
    paths = sorted((SHARED / "att_faces").glob("s*/*.pgm"))
    if paths:
        for path in paths:
            with Image.open(path) as image:
                buf = io.BytesIO()
                square_face(image).save(buf, "PNG", compress_level=1)  # preprocess stores PNG level 1
                pngs.append(buf.getvalue())
        return pngs
    rng = np.random.default_rng(0)
    for _ in range(count_hint):  # no shared data (e.g. a bare GPU box): face-like blobs, similar PNG sizes
        base = rng.integers(60, 200, 3)
        yy, xx = np.mgrid[0:128, 0:128]
        pixels = np.clip(
            base + 40 * np.sin(xx / rng.uniform(8, 20))[..., None] + rng.normal(0, 6, (128, 128, 3)), 0, 255
        )
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse((24, 16, 104, 120), fill=tuple(int(v) for v in rng.integers(120, 230, 3)))
        buf = io.BytesIO()
        image.save(buf, "PNG", compress_level=1)
        pngs.append(buf.getvalue())
    return pngs


def write_dataset(dst: Path, pngs: list[bytes], rows: int) -> Path:
    """A committed preprocess-style dataset with ``rows`` train faces (PNG bytes repeated) + 2 val identities."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (dst / "data").mkdir(parents=True)
    n_val = 4
    images = [pngs[i % len(pngs)] for i in range(rows)] + pngs[:n_val]
    split = ["train"] * rows + ["val"] * n_val
    identity = [f"id{i % 40}" for i in range(rows)] + ["v0", "v0", "v1", "v1"]
    labels = sorted(set(identity))
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "identity": identity,
            "label": pa.array([labels.index(x) for x in identity], pa.int32()),
            "split": split,
            "source": [f"bench/{i:07d}.png" for i in range(len(images))],
        }
    )
    for start in range(0, len(images), 4096):
        pq.write_table(table.slice(start, 4096), dst / "data" / f"part-{start // 4096:05d}.parquet")
    pq.write_table(pa.table({"source": pa.array([], pa.string()), "reason": pa.array([], pa.string())}),
                   dst / "rejects.parquet")  # fmt: skip
    (dst / "manifest.json").write_text(json.dumps({"bench": True, "rows": len(images)}))
    (dst / "_SUCCESS").write_text("")
    return dst


# --------------------------------------------------------------------------------------------- the worker


def bench_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from ipsr_model.degradation import MultiScaleDegradation
    from ipsr_model.identity import IdentityNet
    from ipsr_model.images import from_uint8
    from ipsr_model.losses import IdentityPreservingLoss
    from ipsr_model.training import make_optimizer, training_step
    from ipsr_model.unet import UNetGenerator

    context = ray.train.get_context()
    world = context.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(cfg["threads"])
    torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    autocast = torch.bfloat16 if cuda and cfg["bf16"] else None

    identity_net = IdentityNet(cfg["identity_weights"]).to(device, memory_format=memory_format)
    generator = UNetGenerator(cfg["base_channels"]).to(device, memory_format=memory_format)
    optimizer = make_optimizer(generator)
    model = ray.train.torch.prepare_model(generator, move_to_device=False)
    if cfg["compile"]:
        model = torch.compile(model)
    loss_fn = IdentityPreservingLoss(identity_net)
    degradation = MultiScaleDegradation()
    rng = torch.Generator().manual_seed(context.get_world_rank())  # CPU draws: no device sync per step
    sources = _sources(cfg, device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    rates: dict[str, list[float]] = {"memory": [], "stream": []}
    for _ in range(cfg["rounds"]):
        for name, source in sources.items():
            for i in range(cfg["warmup"] + cfg["steps"]):
                if i == cfg["warmup"]:
                    sync()
                    start = time.perf_counter()
                hr = from_uint8(next(source), memory_format)
                training_step(model, loss_fn, optimizer, hr, degradation, rng, autocast_dtype=autocast)
            sync()
            rates[name].append(world * cfg["batch_size"] * cfg["steps"] / (time.perf_counter() - start))
    # Ray Train V2 hands the driver the metrics of the last *checkpointed* report only.
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "rates.json").write_text(json.dumps(rates))
        checkpoint = ray.train.Checkpoint.from_directory(directory) if context.get_world_rank() == 0 else None
        ray.train.report({"rates": json.dumps(rates)}, checkpoint=checkpoint)


def _sources(cfg: dict, device) -> dict:
    """The two feeds of HR uint8 batches: decoded PNGs held in memory, and the Ray Data shard streamed."""
    import ray.train
    import torch

    from ipsr_platform.faces import decode_faces

    batch_size = cfg["batch_size"]
    memory = torch.from_numpy(decode_faces(cfg["memory_pngs"]))  # host uint8, like the stream's batches
    pick = torch.Generator().manual_seed(0)

    def memory_batches():
        while True:
            rows = torch.randint(len(memory), (batch_size,), generator=pick)
            yield memory[rows].to(device)

    shard = ray.train.get_dataset_shard("train")

    def stream_batches():
        while True:  # an epoch restart inside the timed steps would be counted (the dataset is sized to avoid it)
            for batch in shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=cfg["shuffle_buffer"], device=device
            ):
                yield batch["hr"]

    return {"memory": memory_batches(), "stream": stream_batches()}


# ------------------------------------------------------------------------------------------------ FLOPs


def flops_per_sample(base_channels: int) -> dict[str, float]:
    """Forward FLOPs of the U-Net (128²) and FaceNet (160²) per image, and of one full training step per sample
    (degradation excluded; counted by torch.utils.flop_counter on CPU, batch 2)."""
    import warnings

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ipsr_model.degradation import MultiScaleDegradation
    from ipsr_model.identity import IdentityNet
    from ipsr_model.losses import IdentityPreservingLoss
    from ipsr_model.unet import UNetGenerator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identity_net = IdentityNet("none", allow_random=True)  # FLOPs do not depend on the weights
    generator = UNetGenerator(base_channels)
    x = torch.rand(2, 3, 128, 128) * 2 - 1

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2

    with torch.no_grad():
        unet = count(lambda: generator.eval()(x))
        facenet = count(lambda: identity_net(x))
    degradation, rng = MultiScaleDegradation(), torch.Generator().manual_seed(0)

    def step() -> None:  # training_step's FLOPs: its autograd.grad on a leaf breaks FlopCounterMode's module hooks
        lr, _ = degradation(x, rng)
        IdentityPreservingLoss(identity_net)(generator.train()(lr), x).total.backward()

    step_flops = count(step)
    return {"unet_forward": unet, "facenet_forward": facenet, "train_step": step_flops}


# ---------------------------------------------------------------------------------------------------- main


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="H100 variant: width 64, bf16, batch 256, 1 GPU worker")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--base-channels", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per round and source")
    parser.add_argument("--warmup", type=int, help="untimed steps before each timed block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus-per-worker", type=float, help="default: CPU 1 (the other core feeds Ray Data); GPU 4")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--identity-weights", default="casia-webface-offline")
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args()


def main() -> None:
    args = _args()
    gpu = args.gpu
    base = args.base_channels or (64 if gpu else 16)
    batch = args.batch_size or (256 if gpu else 16)
    steps = args.steps or (50 if gpu else 12)
    warmup = args.warmup or (10 if gpu else 2)

    flops = flops_per_sample(base)
    print(
        f"FLOPs per sample at width {base}: U-Net forward {flops['unet_forward'] / 1e9:.2f} G (128²), FaceNet forward "
        f"{flops['facenet_forward'] / 1e9:.2f} G (160²), training step {flops['train_step'] / 1e9:.2f} G "
        "(U-Net fwd+bwd, FaceNet fwd on HR + fwd/bwd-to-input on SR)"
    )
    if args.flops_only:
        return

    import ray

    from ipsr_model.weights import fetch_identity_weights

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    weights = (
        str(fetch_identity_weights(args.identity_weights))
        if Path(args.identity_weights).suffix == ""
        else args.identity_weights
    )
    ray.init(include_dashboard=True, log_to_driver=True)
    cpus = ray.cluster_resources().get("CPU", 1)
    cpus_per_worker = args.cpus_per_worker or (4.0 if gpu else max(1.0, (cpus - 1) // args.workers))
    loop = {
        "threads": max(1, int(cpus_per_worker)), "bf16": not args.no_bf16, "compile": args.compile,
        "identity_weights": weights, "base_channels": base, "batch_size": batch, "steps": steps, "warmup": warmup,
        "rounds": args.rounds, "shuffle_buffer": 4 * batch,
    }  # fmt: skip
    rates = _fit(args, loop, cpus_per_worker)
    report(args, rates, flops, cpus=cpus, cpus_per_worker=cpus_per_worker,
           base=base, batch=batch, steps=steps, warmup=warmup)  # fmt: skip
    ray.shutdown()


def _fit(args: argparse.Namespace, loop: dict, cpus_per_worker: float) -> dict:
    """One Ray Train run of ``bench_loop`` on a dataset sized so that no epoch ends inside the timed steps."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ipsr_model.paths import ipsr_home
    from ipsr_platform.config import TrainConfig
    from ipsr_platform.storage import Storage
    from jobs.train_data import inspect_dataset, train_dataset

    pngs = face_pngs()
    batch = loop["batch_size"]
    rows_needed = args.workers * batch * args.rounds * (loop["steps"] + loop["warmup"])
    with tempfile.TemporaryDirectory(prefix="ipsr-bench-train-") as tmp:
        data_dir = write_dataset(Path(tmp) / "faces", pngs, rows=int(rows_needed * 1.1) + args.workers * batch)
        config = TrainConfig(data=str(data_dir), run_name="bench", batch_size=batch, num_workers=args.workers)
        data = inspect_dataset(config, Storage.from_env())
        trainer = TorchTrainer(
            bench_loop,
            train_loop_config=loop | {"memory_pngs": pngs},
            scaling_config=ScalingConfig(
                num_workers=args.workers,
                use_gpu=args.gpu,
                resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if args.gpu else {}),
            ),  # fmt: skip
            run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=str(ipsr_home() / "bench-runs")),
            datasets={"train": train_dataset(data)},
        )
        result = trainer.fit()
    return json.loads(result.metrics["rates"])


def report(args: argparse.Namespace, rates: dict, flops: dict, **run: float) -> None:
    """The medians of both feeds, their ratio and the achieved TFLOP/s; JSON to stdout (and ``--json``)."""
    memory, stream = statistics.median(rates["memory"]), statistics.median(rates["stream"])
    device = "cuda" if args.gpu else "cpu"
    summary = {
        "device": device, "host": platform.node(), "cpus": run["cpus"], "workers": args.workers,
        "cpus_per_worker": run["cpus_per_worker"], "base_channels": run["base"], "batch_size_per_worker": run["batch"],
        "bf16": args.gpu and not args.no_bf16,
        "steps": run["steps"], "warmup": run["warmup"], "rounds": args.rounds, "rates": rates,
        "memory_img_per_s": memory, "stream_img_per_s": stream, "ratio": stream / memory,
        "flops_per_sample": flops, "achieved_tflops_stream": stream * flops["train_step"] / 1e12,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    print(
        f"\n{device}, {args.workers} worker(s) x batch {run['batch']}, width {run['base']}: "
        f"in-memory {memory:.1f} img/s, Ray Data streaming {stream:.1f} img/s → ratio {stream / memory:.3f} "
        "(target >= 0.9); "
        f"{summary['achieved_tflops_stream']:.3f} TFLOP/s achieved by the training step"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
