"""`ipsr serve` against a million-face gallery: identify latency through the real HTTP path, fp32 vs fp16 matrix.

    .venv/bin/python bench/serve_gallery.py [--faces 1000000] [--requests 200] [--s3-faces 100000]

A synthetic gallery (``--faces`` random unit 512-D embeddings, two per identity) is written as one segment with
the store's own ``GalleryStore.append``; its load (list + read + merge, what a replica does) is timed from local
disk and, with ``--s3-faces N``, from an S3 API (moto on 127.0.0.1) for a gallery of N faces. Then one replica serves a freshly registered,
untrained U-Net (speed does not depend on the weights) with the gallery matrix in float32, then float16 (the
baseline of the ratio: same gallery, same probes, same process): sequential requests of 1, 8 and 32 16x12 ORL
probes each (bicubic up → SR → FaceNet → best cosine per identity over every row → top-5), p50/p99 per request,
the replica's resident memory, and the first request's latency (the replica loading the gallery).
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import TOKEN, cpu_name, load_orl, register  # noqa: E402  (bench/serve.py: same registration and probes)

BATCHES = (1, 8, 32)


def write_gallery(root: str, faces: int, sha256: str, seed: int = 0) -> float:
    """Random unit embeddings, two rows per identity, appended as one segment; returns seconds."""
    import numpy as np

    from ipsr_platform.storage import Storage
    from serving.gallery import GalleryStore

    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((faces, 512), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    identities = [f"id{i // 2:07d}" for i in range(faces)]
    began = time.perf_counter()
    GalleryStore(root, Storage.from_env()).append("million", identities, embeddings, [""] * faces, [None] * faces,
                                                  sha256)
    return time.perf_counter() - began


def load_seconds(root: str) -> float:
    from ipsr_platform.storage import Storage
    from serving.gallery import GalleryStore

    began = time.perf_counter()
    gallery = GalleryStore(root, Storage.from_env()).load("million")
    assert gallery is not None and len(gallery)
    return time.perf_counter() - began


def replica_rss_mib(app: str) -> float | None:
    """Resident memory of the app's replica process (its title is ray::ServeReplica:<app>:<deployment>)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"ServeReplica:{app}:".encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                rss = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
                return int(rss.split()[1]) / 1024
        except (OSError, StopIteration):
            continue
    return None


def measure(url: str, auth: dict, probes: list[bytes], batch: int, requests_n: int) -> dict:
    import requests

    body = {"images": [{"name": f"p{i}", "data": base64.b64encode(probes[i % len(probes)]).decode()}
                       for i in range(batch)]}
    session, latencies = requests.Session(), []
    for _ in range(requests_n):
        began = time.perf_counter()
        r = session.post(url, json=body, headers=auth, timeout=300)
        r.raise_for_status()
        latencies.append((time.perf_counter() - began) * 1000)
    latencies.sort()
    return {"p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "probes_per_s": batch * 1000 / statistics.mean(latencies)}


def serve_and_measure(root: str, dtype: str, weights: str, probes: list[bytes], args, port: int) -> dict:
    import requests
    from ray import serve

    from ipsr_platform.config import ServeConfig
    from serving.app import build_app

    app = f"g{dtype}"
    cfg = ServeConfig(identity_weights=weights, galleries=root, gallery_dtype=dtype, cpus_per_replica=1,
                      torch_threads=os.cpu_count(), max_batch_size=32, max_ongoing_requests=32)
    serve.run(build_app(cfg, name=app), name=app, route_prefix=f"/{app}")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{port}/{app}/v1/galleries/million/identify"
    began = time.perf_counter()
    requests.post(url, json={"images": [{"name": "p", "data": base64.b64encode(probes[0]).decode()}]}, headers=auth,
                  timeout=600).raise_for_status()
    out = {"first_request_s": time.perf_counter() - began}
    for batch in BATCHES:
        out[batch] = measure(url, auth, probes, batch, args.requests if batch == 1 else max(10, args.requests // 4))
        print(f"{dtype} batch {batch:2d}: p50 {out[batch]['p50']:.1f} ms, p99 {out[batch]['p99']:.1f} ms, "
              f"{out[batch]['probes_per_s']:.1f} probes/s", flush=True)
    out["rss_mib"] = replica_rss_mib(app)
    serve.delete(app)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200, help="sequential 1-probe requests (batches: a quarter)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "att_faces")
    parser.add_argument("--dtypes", default="float32,float16", help="gallery matrix dtypes, the first is the baseline")
    parser.add_argument("--s3-faces", type=int, default=0,
                        help="also time the load of a gallery this large from an S3 API (moto on 127.0.0.1; moto "
                             "serves a ranged GET of a 2 GB object slowly, so keep it to ~100k)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ipsr-bench-gallery-"))
    from ipsr_model.weights import fetch_identity_weights

    from ipsr_model.weights import load_identity_weights

    weights = str(fetch_identity_weights("casia-webface-offline"))
    sha256 = load_identity_weights(weights)[1]  # the served FaceNet's: the gallery must be comparable
    os.environ.update(IPSR_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
                      IPSR_SERVE_TOKEN=TOKEN, RAY_AUTH_MODE="disabled")
    import ray
    import torch
    from ray import serve

    from ipsr_model.unet import UNetGenerator

    root = str(home / "galleries")
    print(f"writing {args.faces:,} faces: {write_gallery(root, args.faces, sha256):.1f} s", flush=True)
    loads = {f"local disk, {args.faces:,} faces": min(load_seconds(root) for _ in range(2))}
    if args.s3_faces:
        loads[f"S3 (moto, 127.0.0.1), {args.s3_faces:,} faces"] = s3_load(args.s3_faces, sha256)
    for where, seconds in loads.items():
        print(f"load from {where}: {seconds:.1f} s", flush=True)

    torch.manual_seed(0)
    register(UNetGenerator(16).eval())
    _, probes = load_orl(args.data)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    results = {dtype: serve_and_measure(root, dtype, weights, probes, args, port) for dtype in args.dtypes.split(",")}
    serve.shutdown()
    ray.shutdown()
    report(args, loads, results)


def s3_load(faces: int, sha256: str) -> float:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request otherwise
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    write_gallery("s3://bench/galleries", faces, sha256)
    seconds = min(load_seconds("s3://bench/galleries") for _ in range(2))
    server.stop()
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name)
    return seconds


def report(args, loads: dict, results: dict) -> None:
    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_name()}); gallery {args.faces:,} faces, {args.faces // 2:,} identities; "
          f"U-Net width 16; {args.requests} 1-probe requests\n")
    print("| matrix | probes/request | p50 ms | p99 ms | probes/s | replica RSS MiB | first request s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, r in results.items():
        for batch in BATCHES:
            print(f"| {dtype} | {batch} | {r[batch]['p50']:.1f} | {r[batch]['p99']:.1f} | "
                  f"{r[batch]['probes_per_s']:.1f} | {r['rss_mib']:.0f} | {r['first_request_s']:.1f} |")
    if {"float32", "float16"} <= set(results):
        fp32, fp16 = results["float32"], results["float16"]
        print(f"\nfloat16 / float32 p50 at 1 probe: **{fp16[1]['p50'] / fp32[1]['p50']:.2f}×**; replica RSS "
              f"{fp16['rss_mib'] - fp32['rss_mib']:+.0f} MiB")
    for where, seconds in loads.items():
        print(f"gallery load (list + read + merge) from {where}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
