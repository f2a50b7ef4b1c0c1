"""Bulk search: `ipsr identify` (Ray Data job) vs the batched HTTP service, same probes, gallery and model, same run.

    .venv/bin/python bench/identify.py --data DATASET [--probes 1000] [--gallery-faces 100000] [--concurrency 4,16,32]

DATASET is an `ipsr preprocess` output. Per identity (sorted), its first aligned face is enrolled (`ipsr enrol
--aligned`, real FaceNet embeddings) and its next faces become probes, degraded to 16x12 (the degradation's
antialiased bicubic down), until ``--probes``; the gallery is then filled up to ``--gallery-faces`` rows with random
unit embeddings of other identities (as bench/serve_gallery.py). The model is a freshly registered U-Net
(``--base-channels``; speed does not depend on the weights).

HTTP: one deployment per ``--http-dtypes`` gallery dtype (the service's default float16, then the job's CPU default
float32), the default settings except ``--cpus`` threads on one replica and room for the load; closed-loop clients,
one probe per request (each client sends the next when answered), every probe once per concurrency level.
Job: ``jobs.identify.run`` end to end (listing, actor start-up, reads, results), defaults (one actor per CPU).
Prints probes/s of each, the ratio job / best HTTP, and how many probes' top-1 differ from the service's.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import TOKEN, cpu_name, free_port, register  # noqa: E402  (bench/serve.py: same registration)


def split_faces(data: Path, probes: int, dest: Path) -> tuple[Path, Path]:
    """DEST/gallery/<identity>/0.png (each identity's first face) and DEST/probes/<identity>-<n>.png (its next
    ones at 16x12), identities in order until ``probes`` probes."""
    import pyarrow.parquet as pq

    from ipsr_model.degradation import resize
    from ipsr_model.images import to_pil, to_tensor
    from ipsr_platform.faces import decode_face, encode_png

    table = pq.read_table(data / "data", columns=["identity", "source", "image"])
    table = table.sort_by([("identity", "ascending"), ("source", "ascending")])
    (dest / "probes").mkdir(parents=True)
    seen: dict[str, int] = {}
    written = 0
    for identity, png in zip(table.column("identity").to_pylist(), table.column("image").to_pylist()):
        if written == probes:
            break
        n = seen.get(identity, 0)
        seen[identity] = n + 1
        if n == 0:
            (dest / "gallery" / identity).mkdir(parents=True)
            (dest / "gallery" / identity / "0.png").write_bytes(png)
        else:
            low = to_pil(resize(to_tensor(decode_face(png)), (16, 12)).clamp(-1, 1))[0]
            (dest / "probes" / f"{identity}-{n}.png").write_bytes(encode_png(low))
            written += 1
    return dest / "gallery", dest / "probes"


def fill_gallery(root: str, name: str, rows: int, sha256: str) -> None:
    """Random unit embeddings of identities ``filler…``, two rows each, as one more segment."""
    import numpy as np

    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

    embeddings = np.random.default_rng(0).standard_normal((rows, 512), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    identities = [f"filler{i // 2:07d}" for i in range(rows)]
    GalleryStore(root, Storage.from_env()).append(name, identities, embeddings, [""] * rows, [None] * rows, sha256)


def http_identify(url: str, probes: list[Path], clients: int) -> tuple[float, dict[str, str]]:
    """Seconds to identify every probe, one per request, ``clients`` in flight; and each probe's top-1."""
    import base64

    import requests

    auth = {"Authorization": f"Bearer {TOKEN}"}

    def post(path: Path) -> tuple[str, str]:
        image = {"name": path.name, "data": base64.b64encode(path.read_bytes()).decode()}
        r = requests.post(f"{url}/v1/galleries/g/identify", json={"images": [image]}, headers=auth, timeout=600)
        r.raise_for_status()
        return path.name, r.json()["results"][0]["matches"][0]["identity"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        top1 = dict(pool.map(post, probes))
    return time.perf_counter() - start, top1


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an `ipsr preprocess` output")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--gallery-faces", type=int, default=100_000)
    parser.add_argument("--concurrency", default="4,16,32", help="HTTP clients in flight, one level after another")
    parser.add_argument("--http-dtypes", default="float16,float32", help="the service's gallery_dtype, in turn")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="torch threads of the HTTP replica")
    parser.add_argument("--identity-weights", default="casia-webface-offline")
    return parser.parse_args()


def main() -> None:
    args = _args()
    from ipsr_model.weights import fetch_identity_weights

    weights = str(fetch_identity_weights(args.identity_weights))  # before $IPSR_HOME moves to the scratch home
    home = Path(tempfile.mkdtemp(prefix="ipsr-bench-identify-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ.update(IPSR_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
                      IPSR_SERVE_TOKEN=TOKEN, RAY_AUTH_MODE="disabled")  # fmt: skip
    gallery_dir, probe_dir = split_faces(args.data, args.probes, home / "faces")
    probes = sorted(probe_dir.iterdir())

    import ray
    import torch

    from ipsr_model.unet import UNetGenerator
    from ipsr_platform.config import EnrolConfig, IdentifyConfig, ServeConfig
    from jobs import enrol, identify
    from serving import app

    torch.manual_seed(0)
    version = register(UNetGenerator(args.base_channels).eval())
    ray.init(include_dashboard=False, log_to_driver=False)
    enrolled = enrol.run(EnrolConfig(input=str(gallery_dir), gallery="g", aligned=True, identity_weights=weights))
    fill_gallery(str(home / "galleries"), "g", args.gallery_faces - enrolled.gallery_faces,
                 identify_sha(weights))  # fmt: skip
    levels = [int(c) for c in args.concurrency.split(",")]
    http = {}
    for dtype in args.http_dtypes.split(","):
        serve_cfg = ServeConfig(identity_weights=weights, port=free_port(), cpus_per_replica=args.cpus,
                                max_batch_size=32, max_ongoing_requests=max(64, *levels), max_queued_requests=1024,
                                generator=f"models:/ipsr-unet/{version}", gallery_dtype=dtype)  # fmt: skip
        url = app.deploy(serve_cfg, echo=lambda *_: None)
        http_identify(url, probes[:32], 8)  # warm-up: gallery load, first batches
        http |= {(dtype, c): http_identify(url, probes, c) for c in levels}
        app.undeploy()  # the job gets the machine to itself, as the service had it

    out = home / "out"
    config = IdentifyConfig(probes=str(probe_dir), gallery="g", out=str(out), identity_weights=weights,
                            generator=f"models:/ipsr-unet/{version}")  # fmt: skip
    start = time.perf_counter()
    summary = identify.run(config)
    job_s = time.perf_counter() - start
    ray.shutdown()
    report(args, http, job_s, summary, out, len(probes))


def identify_sha(weights: str) -> str:
    from ipsr_model.weights import load_identity_weights

    return load_identity_weights(weights)[1]


def report(args, http: dict, job_s: float, summary, out: Path, n: int) -> None:
    import pyarrow.parquet as pq

    job_top1 = {r["probe"]: r["identity"] for r in pq.read_table(out / "matches.parquet").to_pylist() if r["rank"] == 1}
    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_name()}); {n} probes at 16x12 of {args.data.name}; gallery "
          f"{args.gallery_faces} faces; U-Net width {args.base_channels}")  # fmt: skip
    print("| path | seconds | probes/s | top-1 ≠ job's |")
    print("|---|---|---|---|")
    for (dtype, clients), (seconds, top1) in http.items():
        differ = sum(top1[p] != job_top1.get(p) for p in top1)
        print(f"| HTTP, {dtype} gallery, {clients} clients × 1 probe/request | {seconds:.1f} | {n / seconds:.1f} | "
              f"{differ} |")  # fmt: skip
    print(f"| `ipsr identify`, {summary.model} (end to end) | {job_s:.1f} | {n / job_s:.1f} | — |")
    best = min(seconds for seconds, _ in http.values())
    print(f"\nratio job / best HTTP: **{best / job_s:.2f}x**; searched {summary.identified} of {n}")


if __name__ == "__main__":
    main()
