"""Bulk enrolment: `ipsr enrol` (Ray Data job) vs HTTP enrolment to a running `ipsr serve`, same faces, same run.

    .venv/bin/python bench/enrol.py --data DATASET [--faces 2000] [--clients 4] [--per-request 32]

DATASET is an `ipsr preprocess` output: its first ``--faces`` aligned faces (PNG) are written as identity folders
into a scratch directory, so both paths read the same already-aligned images (embedding only: HTTP with
``aligned=true``, the job with ``--aligned``). HTTP: ``--clients`` threads post ``--per-request`` faces per
request to one deployment with the default settings (1 replica; its CPU share is what Ray gives it). Job:
``jobs.enrol.run`` end to end (listing, actor start-up, segments). Each writes its own gallery; both must then hold
exactly ``--faces`` rows, and a rerun of the job must add none. Prints faces/s of both and the ratio.
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


def export_faces(data: Path, faces: int, dest: Path) -> list[tuple[str, str]]:
    """The first ``faces`` aligned faces of a preprocess output as DEST/<identity>/<n>.png; (identity, path)."""
    import pyarrow.parquet as pq

    table = pq.read_table(data / "data", columns=["identity", "source", "image"])
    table = table.sort_by([("identity", "ascending"), ("source", "ascending")]).slice(0, faces)
    out = []
    for i, (identity, png) in enumerate(zip(table.column("identity").to_pylist(), table.column("image").to_pylist())):
        (dest / identity).mkdir(parents=True, exist_ok=True)
        path = dest / identity / f"{i:06d}.png"
        path.write_bytes(png)
        out.append((identity, str(path)))
    return out


def http_enrol(url: str, faces: list[tuple[str, str]], clients: int, per_request: int) -> float:
    """Seconds to enrol every face over HTTP (aligned=true), ``clients`` requests in flight."""
    import requests

    auth = {"Authorization": f"Bearer {TOKEN}"}
    chunks = [faces[i : i + per_request] for i in range(0, len(faces), per_request)]

    def post(chunk: list[tuple[str, str]]) -> int:
        r = requests.post(
            f"{url}/v1/galleries/http/enroll", params={"aligned": "true"}, headers=auth, timeout=600,
            files=[("image", (Path(p).name, Path(p).read_bytes(), "image/png")) for _, p in chunk],
            data=[("identity", identity) for identity, _ in chunk]
            + [("image_id", f"{identity}/{Path(p).name}") for identity, p in chunk],
        )  # fmt: skip
        r.raise_for_status()
        return r.json()["enrolled"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        enrolled = sum(pool.map(post, chunks))
    seconds = time.perf_counter() - start
    if enrolled != len(faces):
        raise SystemExit(f"HTTP enrolled {enrolled} of {len(faces)} faces")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an `ipsr preprocess` output")
    parser.add_argument("--faces", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4, help="HTTP requests in flight")
    parser.add_argument("--per-request", type=int, default=32, help="faces per HTTP request")
    parser.add_argument("--identity-weights", default="casia-webface-offline")
    args = parser.parse_args()

    from ipsr_model.weights import fetch_identity_weights

    weights = str(fetch_identity_weights(args.identity_weights))  # before $IPSR_HOME moves to the scratch home
    home = Path(tempfile.mkdtemp(prefix="ipsr-bench-enrol-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ.update(IPSR_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
                      IPSR_SERVE_TOKEN=TOKEN, RAY_AUTH_MODE="disabled")  # fmt: skip
    faces = export_faces(args.data, args.faces, home / "faces")

    import ray
    import torch

    from ipsr_model.unet import UNetGenerator
    from ipsr_platform.config import EnrolConfig, ServeConfig
    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage
    from jobs.enrol import run
    from serving import app

    torch.manual_seed(0)
    register(UNetGenerator(16).eval())
    ray.init(include_dashboard=False, log_to_driver=False)
    url = app.deploy(ServeConfig(identity_weights=weights, port=free_port()), echo=lambda *_: None)
    http_s = http_enrol(url, faces, args.clients, args.per_request)
    app.undeploy()  # the job gets the machine to itself, as the service had it

    config = EnrolConfig(input=str(home / "faces"), gallery="job", aligned=True, identity_weights=weights)
    start = time.perf_counter()
    summary = run(config)
    job_s = time.perf_counter() - start
    again = run(config)
    store = GalleryStore(str(home / "galleries"), Storage.from_env())
    rows = {name: len(store.load(name)) for name in ("http", "job")}
    ray.shutdown()
    if rows != {"http": len(faces), "job": len(faces)} or again.enrolled or summary.enrolled != len(faces):
        raise SystemExit(f"gallery rows {rows}, job enrolled {summary.enrolled} then {again.enrolled} on rerun")

    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_name()}); {len(faces)} aligned faces of {args.data.name}")
    print("| path | seconds | faces/s |")
    print("|---|---|---|")
    print(f"| HTTP enrol ({args.clients} clients × {args.per_request} faces/request) | {http_s:.1f} | "
          f"{len(faces) / http_s:.1f} |")  # fmt: skip
    print(f"| `ipsr enrol --aligned` (end to end) | {job_s:.1f} | {len(faces) / job_s:.1f} |")
    print(f"\nratio job / HTTP: **{http_s / job_s:.2f}x**; rerun added {again.enrolled}; rows {rows}")


if __name__ == "__main__":
    main()
