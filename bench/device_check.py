"""The device check: every hot path of ipsr, Ray-free, on one accelerator — parity first, then speed.

    python bench/device_check.py --device cpu --out /tmp/dc          # this machine: small sizes, < 3 min (a test)
    python bench/device_check.py --pack .device                      # once, here: what the GPU box needs
    # then, on the lent GPU box (one device `run`, carry [".device"], timeout_s 540):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/*.whl && \
      PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/device_check.py --device cuda --out $OUT \
      --faces .device/faces

The box has torch, numpy, Pillow but no Ray, MLflow, pydantic or facenet-pytorch (its 1.9 MB wheel travels in
``.device``). Everything timed here is the function production calls: ``ipsr_model.training.training_step`` (the
Ray Train loop's step), ``ipsr_platform.faces.FaceAligner`` (the preprocess actors' and serving's aligner) and
``ipsr_model.identify.identify_batch`` (the Serve deployment's batch). FaceNet is randomly initialised (its 94 MB
weights do not travel; same FLOPs), so correctness is CPU-vs-device parity on the same random weights.

Writes ``device_check.json`` and ``device_check.md`` to ``--out`` and prints the tables; exits 1 when a parity check
fails or (on CUDA) a warm training step makes the host wait for the GPU (``step_host_syncs``, found with
``torch.cuda.set_sync_debug_mode``), after writing both files; 0 otherwise — targets not met are reported, not failed.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipsr_model.degradation import BACK_PROJECTION_STEPS, MultiScaleDegradation, resize  # noqa: E402
from ipsr_model.identify import Probe, embed, identify_batch  # noqa: E402
from ipsr_model.identity import IdentityNet  # noqa: E402
from ipsr_model.losses import IdentityPreservingLoss  # noqa: E402
from ipsr_model.training import make_optimizer, training_step  # noqa: E402
from ipsr_model.unet import UNetGenerator  # noqa: E402

FACENET_WHEEL = "facenet-pytorch==2.5.3"
GALLERY_CHUNK = 65536  # ServeConfig.gallery_chunk's default
COMPILE_RESERVE_S = 120
# (name, tolerance): max |a - b| for images, |a - b| / |b| for scalars. CUDA convolutions use TF32 unless told not
# to; parity runs with TF32 off, so fp32 tolerances are tight and bf16 gets its own, looser one.
TOLERANCES = {
    "step_host_syncs": 0,
    "degradation": 1e-4,
    "unet_forward": 1e-3,
    "step_loss": 1e-3,
    "step_grad_norm": 1e-2,
    "step_loss_bf16": 5e-2,
}
# Sizes per mode: the GPU's are the issue's; the CPU's make the same code run in well under 3 minutes on 2 cores.
SIZES = {
    "cuda": {
        "width": 64,
        "train_batches": (64, 128, 256),
        "train_steps": 10,
        "mtcnn_batches": (64, 256),
        "mtcnn_procs": (1, 4),
        "mtcnn_batches_per_proc": 4,
        "galleries": (100_000, 1_000_000),
        "probe_batches": (1, 32, 256),
        "probe_iters": 50,
    },
    "cpu": {
        "width": 16,
        "train_batches": (2, 4),
        "train_steps": 2,
        "mtcnn_batches": (8,),
        "mtcnn_procs": (1, 2),
        "mtcnn_batches_per_proc": 1,
        "galleries": (10_000, 100_000),
        "probe_batches": (1, 8),
        "probe_iters": 5,
    },
}
TARGETS = (
    "H200 targets: train bf16 >= 5000 img/s with precomputed HR embeddings, >= 3500 without; MTCNN >= 2000 "
    "img/s; identify batch 32 >= 10x batch-1 probes/s; 1 probe vs 1M p99 < 20 ms"
)


# --- helpers ----------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def faces_tensor(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random 128×128 'faces' in [-1, 1] (upsampled noise: image-like spectra, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return resize(torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, (128, 128)).clamp(-1, 1)


def random_identity_net(seed: int = 0) -> IdentityNet:
    torch.manual_seed(seed)
    return IdentityNet("none", allow_random=True)


def generator_for(width: int, seed: int, *, residual: bool, dropout: bool = True) -> UNetGenerator:
    torch.manual_seed(seed)
    generator = UNetGenerator(width, residual=residual)
    if not dropout:  # parity: dropout draws differ between devices' generators
        for module in generator.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return generator


def row(section: str, **fields) -> dict:
    print(f"  [{section}] " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
    return {"section": section, **fields}


# --- parity -----------------------------------------------------------------------------------------------------


def _step_once(generator, identity_net, hr, device, memory_format, autocast_dtype=None):
    generator = generator.to(device, memory_format=memory_format)
    loss_fn = IdentityPreservingLoss(identity_net.to(device, memory_format=memory_format), beta=5.0)
    optimizer = make_optimizer(generator, fused=True if device.type == "cuda" else None)
    stats = training_step(
        generator,
        loss_fn,
        optimizer,
        hr.to(device).contiguous(memory_format=memory_format),
        MultiScaleDegradation(),
        torch.Generator().manual_seed(1),
        autocast_dtype=autocast_dtype,
    )
    grads = [p.grad.float().norm() for p in generator.parameters() if p.grad is not None]
    return float(stats.total), float(torch.linalg.vector_norm(torch.stack(grads)))


def host_syncs(generator, identity_net, hr, device) -> int:
    """1 when a warm training step (bf16, channels-last, fused Adam) makes the host wait for the GPU, else 0: the
    step must queue work and move on (what lets the input pipeline and the Python loop hide behind the GPU)."""
    fmt = torch.channels_last
    generator = copy.deepcopy(generator).to(device, memory_format=fmt)
    loss_fn = IdentityPreservingLoss(copy.deepcopy(identity_net).to(device, memory_format=fmt), jitter=0.05)
    optimizer = make_optimizer(generator, fused=True)
    hr, rng = hr.to(device).contiguous(memory_format=fmt), torch.Generator().manual_seed(0)

    def step():
        training_step(generator, loss_fn, optimizer, hr, MultiScaleDegradation(), rng, autocast_dtype=torch.bfloat16)

    step()  # lazy state (Adam's moments, cuDNN plans) is created once, outside the check
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return 0
    except RuntimeError as err:
        print(f"  host sync in the training step: {str(err).splitlines()[0]}", flush=True)
        return 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


def parity(device: torch.device, width: int) -> list[dict]:
    """CPU fp32 (contiguous) is the reference; the subject is ``device`` in the layout production uses there."""
    fmt = torch.channels_last
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    rows = []
    hr = faces_tensor(8, seed=1)
    ref_lr, _ = MultiScaleDegradation()(hr, torch.Generator().manual_seed(1))
    sub_lr, _ = MultiScaleDegradation()(hr.to(device).contiguous(memory_format=fmt), torch.Generator().manual_seed(1))
    rows.append(("degradation", float((ref_lr - sub_lr.cpu()).abs().max())))
    generator = generator_for(width, 0, residual=False, dropout=False).eval()
    with torch.no_grad():
        ref = generator(ref_lr)
        sub = copy.deepcopy(generator).to(device, memory_format=fmt)(sub_lr.contiguous(memory_format=fmt))
    rows.append(("unet_forward", float((ref - sub.cpu()).abs().max())))
    identity_net = random_identity_net()
    ref_loss, ref_grad = _step_once(
        copy.deepcopy(generator), copy.deepcopy(identity_net), hr, torch.device("cpu"), torch.contiguous_format
    )
    sub_loss, sub_grad = _step_once(copy.deepcopy(generator), copy.deepcopy(identity_net), hr, device, fmt)
    bf16_loss, _ = _step_once(copy.deepcopy(generator), copy.deepcopy(identity_net), hr, device, fmt, torch.bfloat16)
    rows += [
        ("step_loss", abs(sub_loss - ref_loss) / abs(ref_loss)),
        ("step_grad_norm", abs(sub_grad - ref_grad) / abs(ref_grad)),
        ("step_loss_bf16", abs(bf16_loss - ref_loss) / abs(ref_loss)),
    ]
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions again
    if device.type == "cuda":
        rows.append(("step_host_syncs", host_syncs(generator, identity_net, hr, device)))
    return [
        row("parity", check=name, error=f"{err:.2e}", tolerance=TOLERANCES[name], ok=bool(err <= TOLERANCES[name]))
        for name, err in rows
    ]


# --- training step ----------------------------------------------------------------------------------------------


def flops_per_sample(width: int, device: torch.device, precomputed: bool) -> float:
    """FLOPs of one training step per sample, counted by PyTorch (convolutions and matmuls): U-Net forward +
    backward, FaceNet forward + backward on SR, FaceNet forward on HR unless its embeddings are precomputed.

    Counted piece by piece: the step's ``autograd.grad`` on a leaf is not supported under FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    generator = generator_for(width, 0, residual=True).to(device)
    identity_net = random_identity_net().to(device)
    lr = faces_tensor(2).to(device)
    with FlopCounterMode(display=False) as counter:
        sr = generator(lr)
        sr.backward(torch.ones_like(sr))
        x = sr.detach().requires_grad_(True)
        identity_net(x).sum().backward()
        if not precomputed:
            with torch.no_grad():
                identity_net(lr)
    return counter.get_total_flops() / 2


def train_case(device, width, batch, mode, precomputed, steps, identity_net) -> dict:
    """img/s of ``training_step`` as the Ray Train worker runs it (fused Adam, CPU-side degradation draws)."""
    cuda = device.type == "cuda"
    fmt = torch.contiguous_format if mode == "fp32" else torch.channels_last
    autocast = None if mode == "fp32" or not cuda else torch.bfloat16
    generator = generator_for(width, 0, residual=True).to(device, memory_format=fmt)
    identity_net = identity_net.to(device, memory_format=fmt)
    model, net = generator, identity_net
    if mode.endswith("compile"):
        model, net = torch.compile(generator), torch.compile(identity_net)
    # Production's jitter (0.05) views each HR anew, so precomputed HR embeddings are used only without it.
    loss_fn = IdentityPreservingLoss(net, beta=5.0, jitter=0.0 if precomputed else 0.05)
    optimizer = make_optimizer(generator, fused=True if cuda else None)
    hr = faces_tensor(batch).to(device).contiguous(memory_format=fmt)
    hr_embedding = embed(identity_net, hr) if precomputed else None
    rng = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()

    def step():
        training_step(
            model,
            loss_fn,
            optimizer,
            hr,
            MultiScaleDegradation(),
            rng,
            autocast_dtype=autocast,
            hr_embedding=hr_embedding,
        )

    for _ in range(2):  # warm-up; the first step compiles when mode says so
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {
        "img_per_s": round(batch * steps / seconds, 1),
        "warmup_s": round(warmup_s, 1),
        "peak_gib": None if peak is None else round(peak, 2),
    }


def training(device, sizes, deadline, compile_ok) -> list[dict]:
    width, rows = sizes["width"], []
    flops = {pre: flops_per_sample(width, device, pre) for pre in (False, True)}
    identity_net = random_identity_net()
    modes = ["fp32", "bf16+cl", "bf16+cl+compile"]
    for mode in modes:  # compile last: the slowest to start, the first to go when time runs short
        for precomputed in (False, True):
            for batch in sizes["train_batches"]:
                fields = {
                    "mode": mode if device.type == "cuda" else mode.replace("bf16", "fp32"),
                    "hr_embeddings": "precomputed" if precomputed else "computed",
                    "batch": batch,
                    "gflop_per_sample": round(flops[precomputed] / 1e9, 2),
                }
                if mode.endswith("compile") and not compile_ok:
                    rows.append(row("train", **fields, skipped="compile not run on this device (--compile)"))
                    continue
                # A compile can take minutes: start one only with COMPILE_RESERVE_S left, so the run ends in time.
                if time.monotonic() > deadline - (COMPILE_RESERVE_S if mode.endswith("compile") else 0):
                    rows.append(row("train", **fields, skipped="time budget spent"))
                    continue
                result = train_case(device, width, batch, mode, precomputed, sizes["train_steps"], identity_net)
                result["tflop_per_s"] = round(result["img_per_s"] * flops[precomputed] / 1e12, 2)
                rows.append(row("train", **fields, **result))
    return rows


# --- MTCNN alignment --------------------------------------------------------------------------------------------


def synthetic_photos(faces_dir: Path | None, count: int, seed: int = 0) -> tuple[list[bytes], bool]:
    """``count`` VGGFace2-like JPEGs (longest side 200-300 px, q90): real faces pasted, scaled and shifted on a
    blurred noise background; without ``faces_dir`` noise only (then MTCNN finds nothing: a lower bound of work)."""
    rng = random.Random(seed)
    sources = (
        sorted(p for p in faces_dir.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".pgm"})
        if faces_dir
        else []
    )
    faces = [Image.open(p).convert("RGB") for p in sources[:64]]
    out = []
    for i in range(count):
        longest = rng.randint(200, 300)
        size = (longest, int(longest * rng.uniform(0.8, 1.0)))
        noise = np.random.default_rng(seed + i).integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        canvas = Image.fromarray(noise).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        if faces:
            face = faces[i % len(faces)]
            scale = rng.uniform(0.6, 0.9) * min(size) / max(face.size)
            face = face.resize((max(1, int(face.width * scale)), max(1, int(face.height * scale))), Image.BICUBIC)
            if rng.random() < 0.5:
                face = face.transpose(Image.FLIP_LEFT_RIGHT)
            canvas.paste(face, (rng.randint(0, size[0] - face.width), rng.randint(0, size[1] - face.height)))
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, bool(faces)


def _align_worker(device: str, threads: int, blobs: list[bytes], batch: int, start, results) -> None:
    """One process of the shared-GPU measurement: build the aligner, wait for the others, align its share."""
    torch.set_num_threads(threads)
    from ipsr_platform.faces import FaceAligner

    aligner = FaceAligner(device)
    aligner.align(blobs[:batch])  # warm-up: cuDNN/oneDNN choose their kernels
    sync(torch.device(device))
    start.wait(timeout=300)
    began, found = time.perf_counter(), 0
    for i in range(0, len(blobs), batch):
        found += sum(not hasattr(r, "reason") for r in aligner.align(blobs[i : i + batch]))
    results.put((len(blobs), found, began, time.perf_counter()))


def _collect(workers: list, results, timeout: float) -> list:
    """Every worker's result, or a clear error as soon as one dies (the others are stopped): no silent hang."""
    import queue

    done, give_up = [], time.monotonic() + timeout
    while len(done) < len(workers):
        try:
            done.append(results.get(timeout=1))
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead or time.monotonic() > give_up:
                for w in workers:
                    w.terminate()
                raise RuntimeError(
                    f"MTCNN worker processes failed (exit codes {dead}) or took > {timeout:.0f} s"
                ) from None
    for w in workers:
        w.join(timeout=60)
    return done


def mtcnn(device: torch.device, sizes: dict, faces_dir: Path | None, deadline: float) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1))
    rows = []
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    for batch in sizes["mtcnn_batches"]:
        for procs in sizes["mtcnn_procs"]:
            if time.monotonic() > deadline:
                rows.append(row("mtcnn", batch=batch, processes=procs, skipped="time budget spent"))
                continue
            blobs, real = synthetic_photos(faces_dir, batch * sizes["mtcnn_batches_per_proc"])
            start, results = ctx.Barrier(procs), ctx.Queue()
            workers = [
                ctx.Process(
                    target=_align_worker, args=(device.type, max(1, threads // procs), blobs, batch, start, results)
                )
                for _ in range(procs)
            ]
            for w in workers:
                w.start()
            done = _collect(workers, results, timeout=600)
            seconds = max(d[3] for d in done) - min(d[2] for d in done)
            images, found = sum(d[0] for d in done), sum(d[1] for d in done)
            rows.append(
                row(
                    "mtcnn",
                    batch=batch,
                    processes=procs,
                    images=images,
                    img_per_s=round(images / seconds, 1),
                    faces_found=round(found / images, 3),
                    real_faces=real,
                )
            )
    return rows


# --- identification ---------------------------------------------------------------------------------------------


def identification(device: torch.device, sizes: dict, deadline: float) -> list[dict]:
    """``identify_batch`` as the deployment calls it per batch: 16x12 probes bicubic-upscaled on the CPU (what its
    probes are when they reach the batch) → U-Net → FaceNet → best per identity → top-5; p50/p99 over calls."""
    fmt = torch.channels_last
    generator = generator_for(sizes["width"], 0, residual=True).eval().to(device, memory_format=fmt)
    identity_net = random_identity_net().to(device, memory_format=fmt)
    dtypes = (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,)
    rows = []
    for gallery_size in sizes["galleries"]:
        names = [f"person-{c}" for c in range(gallery_size // 2)]  # two images per identity
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            gallery = torch.nn.functional.normalize(torch.randn(gallery_size, 512, device=device, generator=g), dim=1)
            gallery = gallery.to(dtype)
            codes = torch.arange(gallery_size, device=device) // 2
            index = SimpleNamespace(embeddings=gallery, codes=codes, names=names)  # a `Searchable`, like GalleryIndex
            for batch in sizes["probe_batches"]:
                case = {"gallery": gallery_size, "dtype": str(dtype)[6:], "batch": batch}  # the row's key columns
                if time.monotonic() > deadline:
                    rows.append(row("identify", **case, skipped="time budget spent"))
                    continue
                low = faces_tensor(batch)[:, :, :16, :12]
                bicubic = resize(low, (128, 128))  # served as `ipsr serve` does: SR, then back-projection
                probes = [Probe(image, True, lr=lr, back_projection=BACK_PROJECTION_STEPS, gallery=index, top_k=5)
                          for image, lr in zip(bicubic, low)]  # fmt: skip
                times = []
                for i in range(sizes["probe_iters"] + 3):
                    sync(device)
                    began = time.perf_counter()
                    identify_batch(generator, identity_net, probes, device, chunk=GALLERY_CHUNK)
                    sync(device)
                    if i >= 3:
                        times.append((time.perf_counter() - began) * 1e3)
                times.sort()
                p50, p99 = statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]
                rows.append(
                    row(
                        "identify",
                        **case,
                        probes_per_s=round(batch * 1e3 / statistics.mean(times), 1),
                        p50_ms=round(p50, 2),
                        p99_ms=round(p99, 2),
                    )
                )
            del gallery, codes, index
    return rows


# --- report -----------------------------------------------------------------------------------------------------


def _best(rows: list[dict], section: str, key: str, **match) -> float | None:
    values = [
        r[key]
        for r in rows
        if r["section"] == section
        and key in r
        and all(r.get(k) == v or (callable(v) and v(r.get(k))) for k, v in match.items())
    ]
    return max(values) if values else None


def targets(rows: list[dict]) -> list[dict]:
    """The issue's H200 targets, read off the rows (None: not measured in this run)."""
    bf16 = lambda mode: mode.startswith("bf16")  # noqa: E731
    pre = _best(rows, "train", "img_per_s", mode=bf16, hr_embeddings="precomputed")
    comp = _best(rows, "train", "img_per_s", mode=bf16, hr_embeddings="computed")
    align = _best(rows, "mtcnn", "img_per_s", real_faces=True)
    big = max((r["gallery"] for r in rows if r["section"] == "identify"), default=None)
    one = _best(rows, "identify", "probes_per_s", gallery=big, batch=1)
    many = _best(rows, "identify", "probes_per_s", gallery=big, batch=32)
    p99 = [
        r["p99_ms"]
        for r in rows
        if r["section"] == "identify" and r.get("gallery") == 1_000_000 and r.get("batch") == 1 and "p99_ms" in r
    ]
    checks = [
        ("train bf16, precomputed HR embeddings", pre, ">=", 5000),
        ("train bf16, HR embeddings computed", comp, ">=", 3500),
        ("MTCNN alignment img/s", align, ">=", 2000),
        ("identify batch 32 / batch 1 probes/s", many / one if one and many else None, ">=", 10),
        ("1 probe vs 1M gallery p99 ms", min(p99) if p99 else None, "<", 20),
    ]
    return [
        {
            "target": name,
            "value": None if value is None else round(value, 2),
            "goal": f"{op} {goal}",
            "met": None if value is None else bool(value >= goal if op == ">=" else value < goal),
        }
        for name, value, op, goal in checks
    ]


def machine(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


def markdown(report: dict) -> str:
    lines = [
        f"# device check — {report['machine'].get('gpu', report['machine']['processor'])}",
        "",
        f"`{json.dumps(report['machine'])}`",
        "",
        f"wall {report['wall_s']} s; parity {'OK' if report['parity_ok'] else 'FAILED'}",
        "",
    ]
    for section in ("parity", "train", "mtcnn", "identify"):
        rows = [r for r in report["rows"] if r["section"] == section]
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "section"))
        if rows:
            lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows] + [""]
    lines += ["## targets (H200)", "", "| target | value | goal | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['value']} | {t['goal']} | {t['met']} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


# --- packing for the GPU box ------------------------------------------------------------------------------------


def pack(dst: Path, data: Path) -> None:
    """The files the GPU box lacks: facenet-pytorch's wheel and 48 real face photos (for MTCNN to find)."""
    dst.mkdir(parents=True, exist_ok=True)
    if not list(dst.glob("facenet_pytorch-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dst), FACENET_WHEEL], check=True
        )
    faces = dst / "faces"
    shutil.rmtree(faces, ignore_errors=True)
    faces.mkdir()
    sources = sorted((data / "facenet_test_images").rglob("*.jpg")) + sorted((data / "att_faces").glob("s*/1.pgm"))
    if not sources:
        raise SystemExit(f"no face images under {data}")
    for i, src in enumerate(sources[:48]):
        Image.open(src).convert("RGB").save(faces / f"{i:02d}.jpg", quality=90)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"packed {dst} ({size / 2**20:.1f} MiB): carry it to the device box")


# --- main -------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="where device_check.json/.md go")
    parser.add_argument(
        "--faces",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="face photos to paste into the MTCNN test images (default: ../shared/data)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new measurements after this many seconds (default 360 cuda, 150 cpu)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile rows (default: on cuda only; CPU inductor compiles take minutes)",
    )
    parser.add_argument("--pack", type=Path, help="write the GPU box's extra files to this folder and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.pack:
        pack(args.pack, args.faces)
        return 0
    if args.out is None:
        parser.error("--out is required")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    sizes = SIZES[device.type]
    began = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else 360 if device.type == "cuda" else 150
    deadline = began + budget
    faces_dir = args.faces if args.faces and args.faces.is_dir() else None
    print(f"device check on {device.type}: {machine(device)}", flush=True)
    rows = parity(device, sizes["width"])
    ok = all(r["ok"] for r in rows)
    rows += identification(device, sizes, deadline)
    rows += mtcnn(device, sizes, faces_dir, deadline)
    rows += training(device, sizes, deadline, args.compile if args.compile is not None else device.type == "cuda")
    report = {
        "machine": machine(device),
        "wall_s": round(time.monotonic() - began, 1),
        "parity_ok": ok,
        "targets": targets(rows) if device.type == "cuda" else [],
        "rows": rows,
        "note": TARGETS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "device_check.md").write_text(text)
    print(text)
    if not ok:
        print(
            "error: parity failed: " + ", ".join(r["check"] for r in rows if r["section"] == "parity" and not r["ok"]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
