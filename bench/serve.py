"""`ipsr serve` load test: closed-loop clients on loopback, batched vs. unbatched deployment in the same run.

    .venv/bin/python bench/serve.py [--data ../shared/data/att_faces] [--concurrency 1,8,32] [--seconds 15]

One Ray instance, one Serve HTTP proxy, two applications of the *same* code that differ only in
``max_batch_size`` (32 vs 1): ``/batched`` and ``/unbatched``. Both share one gallery (ORL ``1.pgm`` of the 40
subjects, enrolled aligned) and serve a freshly registered U-Net (untrained: speed does not depend on the
weights). Each client thread sends one identify request with one 16x12 probe (ORL ``2.pgm`` degraded: bicubic up
→ SR → FaceNet → top-5), waits for the answer and sends the next, for ``--seconds`` per level; the two
deployments alternate at each concurrency level, only one under load at a time.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import io
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token-0123456789abcdef"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "att_faces")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level and deployment")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched deployment")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray CPUs (= torch threads per replica)")
    parser.add_argument("--identity-weights", default="casia-webface-offline")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    weights = scratch_home(args.identity_weights)
    import ray
    import torch
    from ray import serve

    from ipsr_model.unet import UNetGenerator

    torch.manual_seed(0)
    version = register(UNetGenerator(args.base_channels).eval())
    gallery, probes = load_orl(args.data)

    ray.init(
        num_cpus=args.cpus, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=False
    )
    base, variants = deploy_variants(args, weights, levels)
    results = measure(base, gallery, probes, levels, variants, args.warmup, args.seconds)
    serve.shutdown()
    ray.shutdown()
    print_table(results, levels, args, version)


def deploy_variants(args: argparse.Namespace, weights: str, levels: list[int]) -> tuple[str, dict[str, int]]:
    """The batched and the unbatched application of the same code on one Serve proxy; (base URL, name → size)."""
    from ray import serve

    from ipsr_platform.config import ServeConfig
    from serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    common = dict(
        identity_weights=weights,
        device=args.device,
        cpus_per_replica=args.cpus / 2,
        torch_threads=args.cpus,
        gpus_per_replica=0.5 if args.device == "cuda" else 0.0,
        max_ongoing_requests=max(64, max(levels)),
        max_queued_requests=1024,
        batch_wait_timeout_s=0.005,
    )
    variants = {"batched": args.batch_size, "unbatched": 1}
    for name, size in variants.items():
        serve.run(build_app(ServeConfig(**common, max_batch_size=size), name=name), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}", variants


def measure(base: str, gallery: dict[str, bytes], probes: list[bytes], levels: list[int], variants: dict[str, int],
            warmup: float, seconds: float) -> dict[tuple[str, int], dict]:  # fmt: skip
    """Enrol the gallery once, then load each deployment at each level in turn; (name, level) → its numbers."""
    import requests

    auth = {"Authorization": f"Bearer {TOKEN}"}
    files = [("image", (f"{s}.pgm", data)) for s, data in gallery.items()]
    r = requests.post(
        f"{base}/batched/v1/galleries/orl/enroll",
        params={"aligned": "true"},
        files=files,
        data=[("identity", s) for s in gallery],
        headers=auth,
        timeout=300,
    )
    r.raise_for_status()

    results: dict[tuple[str, int], dict] = {}
    for level in levels:
        for name in variants:
            url = f"{base}/{name}/v1/galleries/orl/identify"
            run_load(url, auth, probes, level, warmup)  # warm-up, discarded
            results[name, level] = run_load(url, auth, probes, level, seconds)
            r = results[name, level]
            print(
                f"{name:9s} c={level:2d}: {r['rps']:7.2f} probes/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                f"({r['n']} requests, {r['errors']} errors)",
                flush=True,
            )
    return results


def print_table(results: dict[tuple[str, int], dict], levels: list[int], args: argparse.Namespace, version) -> None:
    print(
        f"\nmachine: {os.cpu_count()} CPUs ({cpu_name()}), device {args.device}; model version {version}, width "
        f"{args.base_channels}; batched max_batch_size {args.batch_size}\n"
    )
    print("| concurrency | batched probes/s | p50 / p99 ms | unbatched probes/s | p50 / p99 ms | ratio |")
    print("|---|---|---|---|---|---|")
    for level in levels:
        b, u = results["batched", level], results["unbatched", level]
        print(
            f"| {level} | {b['rps']:.1f} | {b['p50']:.0f} / {b['p99']:.0f} | {u['rps']:.1f} | "
            f"{u['p50']:.0f} / {u['p99']:.0f} | **{b['rps'] / u['rps']:.2f}** |"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_home(identity_weights: str = "casia-webface-offline") -> str:
    """A throwaway $IPSR_HOME (registry, galleries), removed at exit, and the bench token; the FaceNet weights'
    local path (fetched from the usual cache first)."""
    from ipsr_model.weights import classify_source, fetch_identity_weights

    home = Path(tempfile.mkdtemp(prefix="ipsr-bench-serve-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # no run leaves its registry and gallery behind
    weights = identity_weights
    if classify_source(weights) not in ("path", "none"):
        weights = str(fetch_identity_weights(weights))  # before $IPSR_HOME moves to the scratch home
    os.environ.update(
        IPSR_HOME=str(home),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        IPSR_SERVE_TOKEN=TOKEN,
        RAY_AUTH_MODE="disabled",
    )
    return weights


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def register(generator, alias: str = "champion") -> str:
    """Log the generator in pt2 format (as `ipsr train` does) and register it as ipsr-unet@``alias``."""
    import mlflow
    import torch

    from ipsr_platform import tracking

    uri = tracking.tracking_uri()
    experiment = tracking.ensure_experiment("ipsr-bench-serve", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(
            generator, name="generator", input_example=torch.zeros(2, 3, 128, 128).numpy(), serialization_format="pt2"
        )
    return tracking.register(info.model_uri, "ipsr-unet", alias=alias, uri=uri)


def load_orl(root: Path) -> tuple[dict[str, bytes], list[bytes]]:
    from PIL import Image

    from ipsr_model.degradation import resize
    from ipsr_model.images import square_face, to_pil, to_tensor

    gallery, probes = {}, []
    for i in range(1, 41):
        gallery[f"s{i}"] = (root / f"s{i}" / "1.pgm").read_bytes()
        low = to_pil(resize(to_tensor(square_face(Image.open(root / f"s{i}" / "2.pgm"))), (16, 12)).clamp(-1, 1))[0]
        buf = io.BytesIO()
        low.save(buf, "PNG")
        probes.append(buf.getvalue())
    return gallery, probes


def run_load(url: str, auth: dict, probes: list[bytes], concurrency: int, seconds: float) -> dict:
    """``concurrency`` closed-loop clients for ``seconds``; latencies of the requests that finished in time."""
    import requests

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    bodies = [{"images": [{"name": f"p{i}", "data": base64.b64encode(p).decode()}]} for i, p in enumerate(probes)]

    def client(worker: int) -> None:
        session = requests.Session()
        i = worker
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                ok = session.post(url, json=bodies[i % len(bodies)], headers=auth, timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
            done = time.perf_counter()
            with lock:
                if not ok:
                    errors[0] += 1
                elif done <= deadline:
                    latencies.append((done - started) * 1000)
            i += concurrency

    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 180)  # a request in flight at the deadline still has its own 120 s timeout
    elapsed = min(time.perf_counter(), deadline) - started
    ordered = sorted(latencies) or [float("nan")]
    return {
        "n": len(latencies),
        "errors": errors[0],
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


if __name__ == "__main__":
    main()
