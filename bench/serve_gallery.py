"""`ipsr serve` against a million-face gallery: identify latency through the real HTTP path, fp32 vs fp16 matrix.

    .venv/bin/python bench/serve_gallery.py [--faces 1000000] [--requests 200] [--s3-faces 100000]

A synthetic gallery (``--faces`` random unit 512-D embeddings, two per identity) is written as one segment with
the store's own ``GalleryStore.append``; its load (list + read + merge, what a replica does) is timed from local
disk and, with ``--s3-faces N``, from an S3 API (moto on 127.0.0.1) for a gallery of N faces. Then one replica
serves a freshly registered,
untrained U-Net (speed does not depend on the weights) with the gallery matrix in float32, then float16 (the
baseline of the ratio: same gallery, same probes, same process): sequential requests of 1, 8 and 32 16x12 ORL
probes each (bicubic up → SR → FaceNet → best cosine per identity over every row → top-5), p50/p99 per request,
the replica's resident memory, and the first request's latency (the replica loading the gallery); then
``--enrolments`` sequential one-face enrolments into the big gallery, and 1-probe identifies while another client
enrols a face every ``--enrol-every`` seconds (a live gallery).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import os
import shutil
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


def write_gallery(root: str, faces: int, sha256: str, seed: int = 0) -> float:
    """Random unit embeddings, two rows per identity, appended as one segment; returns seconds."""
    import numpy as np

    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((faces, 512), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    identities = [f"id{i // 2:07d}" for i in range(faces)]
    began = time.perf_counter()
    GalleryStore(root, Storage.from_env()).append(
        "million", identities, embeddings, [""] * faces, [None] * faces, sha256
    )
    return time.perf_counter() - began


def load_seconds(root: str) -> float:
    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

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

    body = {
        "images": [{"name": f"p{i}", "data": base64.b64encode(probes[i % len(probes)]).decode()} for i in range(batch)]
    }
    session, latencies, start = requests.Session(), [], time.perf_counter()
    for _ in range(requests_n):
        began = time.perf_counter()
        r = session.post(url, json=body, headers=auth, timeout=300)
        r.raise_for_status()
        latencies.append(((time.perf_counter() - began) * 1000, began - start))
    # When the slowest requests happened (seconds into the run): a period in them names the background work.
    slowest = sorted(latencies, reverse=True)[:3]
    latencies = sorted(ms for ms, _ in latencies)
    return {
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "probes_per_s": batch * 1000 / statistics.mean(latencies),
        "slowest": [f"{ms:.0f} ms at {at:.1f} s" for ms, at in slowest],
    }


def measure_enrol(url: str, auth: dict, faces: list[bytes], n: int) -> dict:
    """Sequential one-face enrolments (aligned crops) into the big gallery: the replica stores a segment and
    brings its index up to date before answering."""
    import requests

    latencies = []
    for i in range(n):
        began = time.perf_counter()
        r = requests.post(
            url,
            params={"aligned": "true"},
            files=[("image", (f"e{i}.pgm", faces[i % len(faces)]))],
            data=[("identity", f"enrolled-{i}")],
            headers=auth,
            timeout=600,
        )
        r.raise_for_status()
        latencies.append((time.perf_counter() - began) * 1000)
    return {"p50": statistics.median(latencies), "max": max(latencies), "each": [round(ms) for ms in latencies]}


def serve_and_measure(
    root: str, dtype: str, weights: str, probes: list[bytes], args, port: int, faces: list[bytes]
) -> dict:
    import requests
    from ray import serve

    from ipsr_platform.config import ServeConfig
    from serving.app import build_app

    app = f"g{dtype}"
    cfg = ServeConfig(
        identity_weights=weights,
        galleries=root,
        gallery_dtype=dtype,
        cpus_per_replica=1,
        torch_threads=os.cpu_count(),
        max_batch_size=32,
        max_ongoing_requests=32,
    )
    serve.run(build_app(cfg, name=app), name=app, route_prefix=f"/{app}")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{port}/{app}/v1/galleries/million/identify"
    began = time.perf_counter()
    requests.post(
        url, json={"images": [{"name": "p", "data": base64.b64encode(probes[0]).decode()}]}, headers=auth, timeout=600
    ).raise_for_status()
    out = {"first_request_s": time.perf_counter() - began}
    for batch in args.batches:
        out[batch] = measure(url, auth, probes, batch, args.requests if batch == 1 else max(10, args.requests // 4))
        print(
            f"{dtype} batch {batch:2d}: p50 {out[batch]['p50']:.1f} ms, p99 {out[batch]['p99']:.1f} ms, "
            f"{out[batch]['probes_per_s']:.1f} probes/s; slowest {', '.join(out[batch]['slowest'])}",
            flush=True,
        )
    out["rss_mib"] = replica_rss_mib(app)
    if args.enrolments:
        out["enrol"] = measure_enrol(url.replace("/identify", "/enroll"), auth, faces, args.enrolments)
        print(
            f"{dtype} enrol 1 face: p50 {out['enrol']['p50']:.1f} ms, max {out['enrol']['max']:.1f} ms; each (ms, in "
            f"order) {out['enrol']['each']}",
            flush=True,
        )
    if args.enrol_every:
        out["busy"] = identify_while_enrolling(url, auth, probes, faces, args)
        print(
            f"{dtype} batch  1 while enrolling every {args.enrol_every} s: p50 {out['busy']['p50']:.1f} ms, "
            f"p99 {out['busy']['p99']:.1f} ms; slowest {', '.join(out['busy']['slowest'])}",
            flush=True,
        )
    serve.delete(app)
    return out


def identify_while_enrolling(url: str, auth: dict, probes: list[bytes], faces: list[bytes], args) -> dict:
    """1-probe identify latency while another client enrols one face every ``--enrol-every`` seconds: what a
    live gallery sees (each enrolment changes the gallery the identifies scan)."""
    import threading

    stop = threading.Event()

    def enrol() -> None:
        i = 0
        while not stop.wait(args.enrol_every):
            measure_enrol(url.replace("/identify", "/enroll"), auth, faces[i % len(faces) :][:1], 1)
            i += 1

    side = threading.Thread(target=enrol, daemon=True)
    side.start()
    try:
        return measure(url, auth, probes, 1, args.requests)
    finally:
        stop.set()
        side.join(timeout=120)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200, help="sequential 1-probe requests (batches: a quarter)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "att_faces")
    parser.add_argument("--dtypes", default="float32,float16", help="gallery matrix dtypes, the first is the baseline")
    parser.add_argument(
        "--s3-faces",
        type=int,
        default=0,
        help="also time the load of a gallery this large from an S3 API (moto on 127.0.0.1; moto "
        "serves a ranged GET of a 2 GB object slowly, so keep it to ~100k)",
    )
    parser.add_argument("--enrolments", type=int, default=10, help="one-face enrolments timed after the identifies")
    parser.add_argument("--batches", default="1,8,32", help="probes per identify request")
    parser.add_argument(
        "--enrol-every",
        type=float,
        default=2.0,
        help="also time 1-probe identifies while one face is enrolled every this many seconds (0: no)",
    )
    return parser.parse_args()


def main() -> None:
    args = _args()
    args.batches = [int(b) for b in args.batches.split(",")]

    home = Path(tempfile.mkdtemp(prefix="ipsr-bench-gallery-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # a 1M-face gallery is 2 GB: no run may leave one
    from ipsr_model.weights import fetch_identity_weights, load_identity_weights

    weights = str(fetch_identity_weights("casia-webface-offline"))
    sha256 = load_identity_weights(weights)[1]  # the served FaceNet's: the gallery must be comparable
    os.environ.update(
        IPSR_HOME=str(home),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        IPSR_SERVE_TOKEN=TOKEN,
        RAY_AUTH_MODE="disabled",
    )
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
    gallery_faces, probes = load_orl(args.data)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    results = {
        dtype: serve_and_measure(root, dtype, weights, probes, args, port, list(gallery_faces.values()))
        for dtype in args.dtypes.split(",")
    }
    serve.shutdown()
    ray.shutdown()
    report(args, loads, results)


def s3_load(faces: int, sha256: str) -> float:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
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
    print(
        f"\nmachine: {os.cpu_count()} CPUs ({cpu_name()}); "
        f"gallery {args.faces:,} faces, {args.faces // 2:,} identities; "
        f"U-Net width 16; {args.requests} 1-probe requests\n"
    )
    print("| matrix | probes/request | p50 ms | p99 ms | probes/s | replica RSS MiB | first request s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, r in results.items():
        for batch in args.batches:
            print(
                f"| {dtype} | {batch} | {r[batch]['p50']:.1f} | {r[batch]['p99']:.1f} | "
                f"{r[batch]['probes_per_s']:.1f} | {r['rss_mib']:.0f} | {r['first_request_s']:.1f} |"
            )
    for dtype, r in results.items():
        if "busy" in r:
            print(
                f"\n{dtype}: 1-probe identify while a face is enrolled every {args.enrol_every} s: "
                f"p50 {r['busy']['p50']:.1f} ms, p99 {r['busy']['p99']:.1f} ms"
            )
        if "enrol" in r:
            print(
                f"\n{dtype}: one-face enrolment into the {args.faces:,}-face gallery: p50 {r['enrol']['p50']:.1f} ms, "
                f"max {r['enrol']['max']:.1f} ms ({args.enrolments} sequential)"
            )
    if {"float32", "float16"} <= set(results) and 1 in args.batches:
        fp32, fp16 = results["float32"], results["float16"]
        print(
            f"\nfloat16 / float32 p50 at 1 probe: **{fp16[1]['p50'] / fp32[1]['p50']:.2f}×**; replica RSS "
            f"{fp16['rss_mib'] - fp32['rss_mib']:+.0f} MiB"
        )
    for where, seconds in loads.items():
        print(f"gallery load (list + read + merge) from {where}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
