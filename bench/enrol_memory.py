"""Driver memory of `ipsr enrol` as the gallery it grows gets bigger (#26): the same aligned faces enrolled into
galleries already holding 10k and 100k faces; the peak RSS of the driver process alone (its ``VmHWM``).

    .venv/bin/python bench/enrol_memory.py --data DATASET [--faces 200] [--sizes 10000,100000] [--repeats 3]

DATASET is an `ipsr preprocess` output (its first ``--faces`` aligned faces are the new faces, as in bench/enrol.py).
Each size gets a fresh gallery: one segment of random unit embeddings (bench/identify.py's filler, made with the
run's FaceNet sha256 so the job accepts it), then ``python -m jobs.enrol --aligned`` as its own process on one
local Ray cluster started here (the driver is that process; Ray's daemons and actors are not counted). Every run
must enrol all ``--faces`` (its new segments are then removed for the next repeat). Prints the driver's peak RSS
per size (median of ``--repeats``, sizes interleaved) and the ratio largest / smallest.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from enrol import export_faces  # noqa: E402  (bench/enrol.py: the same faces)
from identify import fill_gallery  # noqa: E402  (bench/identify.py: the same filler)
from serve import cpu_name  # noqa: E402


def driver_peak_mib(cmd: list[str], env: dict) -> float:
    """Run ``cmd``; its peak RSS in MiB. The peak is the kernel's high-water mark of the command's own
    memory (``VmHWM``, read every 50 ms while it runs): ``wait4``'s ``ru_maxrss`` would report this bench's own peak,
    which a forked child inherits. Fails loudly if the command fails."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(OSError, IndexError):  # gone between poll and read
                peak = max(peak, int(Path(f"/proc/{proc.pid}/status").read_text().split("VmHWM:")[1].split()[0]))
            time.sleep(0.05)
        log.seek(0)
        out = log.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    return peak / 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an `ipsr preprocess` output")
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--sizes", default="10000,100000", help="faces already in the gallery, per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (peak RSS varies run to run)")
    parser.add_argument("--identity-weights", default="casia-webface-offline")
    args = parser.parse_args()

    from ipsr_model.weights import fetch_identity_weights, load_identity_weights

    weights = str(fetch_identity_weights(args.identity_weights))
    _, sha256 = load_identity_weights(weights)
    home = Path(tempfile.mkdtemp(prefix="ipsr-bench-enrol-memory-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    faces = export_faces(args.data, args.faces, home / "faces")

    import ray

    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

    ray.init(include_dashboard=False, log_to_driver=False)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, IPSR_HOME=str(home))
    peaks: dict[int, list[float]] = {}
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        fill_gallery(str(home / f"galleries-{size}"), "g", size, sha256)
    for _ in range(args.repeats):  # sizes interleaved: a drift of the machine hits them alike
        for size in sizes:
            root = str(home / f"galleries-{size}")
            cmd = [sys.executable, "-m", "jobs.enrol", "--input", str(home / "faces"), "--gallery", "g",
                   "--galleries", root, "--aligned", "--identity-weights", weights]  # fmt: skip
            peaks.setdefault(size, []).append(driver_peak_mib(cmd, env))
            store = GalleryStore(root, Storage.from_env())
            held = len(store.load("g", with_embeddings=False))
            if held != size + len(faces):
                raise SystemExit(f"gallery of {size}: {held} rows after enrolling {len(faces)} faces")
            for segment in store.listing("g")[0][1:]:  # back to the filler alone for the next repeat
                store.storage.delete(f"{store.folder('g')}/segments/{segment}.parquet")
    ray.shutdown()

    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_name()}); {len(faces)} aligned faces of {args.data.name} enrolled")
    print("| faces in the gallery before | driver peak RSS (MiB), median | runs |")
    print("|---:|---:|---|")
    median = {size: statistics.median(runs) for size, runs in peaks.items()}
    for size, runs in peaks.items():
        print(f"| {size:,} | {median[size]:,.0f} | {', '.join(f'{r:,.0f}' for r in runs)} |")
    first, last = median[min(median)], median[max(median)]
    print(f"\nlargest / smallest gallery (medians): **{last / first:.2f}x** ({last - first:+,.0f} MiB)")


if __name__ == "__main__":
    main()
