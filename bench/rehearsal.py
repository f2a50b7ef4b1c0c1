"""VGGFace2-shaped rehearsal on this machine: preprocess and train at growing N, with the driver's memory, the
object store, listing, output sizes, time to the first training step and the data-only ingest rate.

    python bench/rehearsal.py --sizes 20000,50000,100000 --work /tmp/rehearsal   # hours of CPU on 2 cores

For each N: ``bench/synth_faces.py`` writes ``work/src-N`` (360 images per identity, kept for reruns); a private Ray
head (all CPUs, no dashboard) is started in this process; ``python -m jobs.preprocess`` runs as a child process
joined to it (so its own memory is the driver's), sampled every 0.5 s for its peak RSS (``VmHWM``) and every 5 s for
the object store's used bytes (Ray's memory summary); then the **data-only ingest**:
``jobs.train_data.train_dataset`` — the training input pipeline (Parquet read, PNG decode, batching, local shuffle)
with no model — iterated here for ``--ingest`` faces at batch 64, rate over the last three quarters of them, per CPU
core of the cluster; then ``python -m jobs.train`` for ``--steps`` steps (width 16, batch 16, one worker, the real
FaceNet loss) and its time from process start to the first logged step (``--log-every 1``; the MLflow metric's
timestamp).

Writes ``OUT/rehearsal.json`` (one row per N), ``OUT/rehearsal.md`` (the table) and ``OUT/rehearsal.png`` (N vs time
and memory). Numbers are this machine's; see bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import cpu_name  # noqa: E402
from bench.synth_faces import synthesize  # noqa: E402

PER_IDENTITY = 360


class Sampler:
    """Polls a child process's peak RSS and the object store's usage until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.rss_peak_mb = 0.0
        self.store_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray._private.internal_api import memory_summary

        polls = 0
        while not self._stop.is_set():
            polls += 1
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                self.rss_peak_mb = max(self.rss_peak_mb, int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024)
            except (OSError, TypeError):
                pass
            if polls % 10:  # the object-store summary asks every worker: every 5 s, not to slow what it measures
                self._stop.wait(self.interval)
                continue
            try:
                used = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
                self.store_peak_mb = max(self.store_peak_mb, float(used[1])) if used else self.store_peak_mb
            except Exception:  # noqa: BLE001 - the summary RPC can fail while the cluster is busy; next poll
                pass
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def preprocess(src: Path, out: Path, env: dict) -> dict:
    args = [sys.executable, "-m", "jobs.preprocess", "--input", str(src / "train"), "--output", str(out), "--overwrite"]
    start = time.perf_counter()
    child = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(child.pid)
    _, err = child.communicate(timeout=4 * 3600)
    sampler.stop()
    if child.returncode:
        raise SystemExit(f"preprocess failed ({child.returncode}): {err.decode()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "preprocess_wall_s": round(time.perf_counter() - start, 1),
        "aligned": manifest["counts"]["aligned"],
        "list_s": manifest["timings_s"]["list"],
        "process_s": manifest["timings_s"]["process"],
        "commit_s": manifest["timings_s"]["commit"],
        "steady_img_s": manifest["images_per_s"]["steady"],
        "end_to_end_img_s": manifest["images_per_s"]["end_to_end"],
        "driver_peak_rss_mb": round(sampler.rss_peak_mb, 1),
        "object_store_peak_mb": round(sampler.store_peak_mb, 1),
        "output_mb": round(_du_mb(out / "data"), 1),
        "shards": len(manifest["files"]),
        "manifest_kb": round((out / "manifest.json").stat().st_size / 1024, 1),
    }


def ingest(out: Path, faces: int, cpus: float) -> dict:
    """The training input pipeline alone (no model): faces/s once warm, per CPU core."""
    from ipsr_platform.config import TrainConfig
    from ipsr_platform.storage import Storage
    from jobs.train_data import inspect_dataset, train_dataset

    data = inspect_dataset(TrainConfig(data=str(out), run_name="ingest"), Storage.from_env())
    batches = train_dataset(data).iter_torch_batches(batch_size=64, local_shuffle_buffer_size=256, drop_last=True)
    n, t0, n0 = 0, None, 0
    for batch in batches:
        n += len(batch["hr"])
        if t0 is None and n >= faces // 4:
            # Start-up (workers, first reads) and what was prefetched meanwhile are excluded: a long run amortises them.
            t0, n0 = time.perf_counter(), n
        if n >= faces:
            break
    rate = (n - n0) / (time.perf_counter() - t0)
    return {"ingest_img_s": round(rate, 1), "ingest_img_s_per_core": round(rate / cpus, 1)}


def train(out: Path, name: str, steps: int, env: dict) -> dict:
    from ipsr_platform import tracking

    args = [
        sys.executable,
        "-m",
        "jobs.train",
        "--data",
        str(out),
        "--run-name",
        name,
        "--max-steps",
        str(steps),
        "--batch-size",
        "16",
        "--base-channels",
        "16",
        "--log-every",
        "1",
        "--checkpoint-every",
        str(steps),
    ]
    start = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"train failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    record = json.loads((Path(env["IPSR_HOME"]) / "runs" / name / "ipsr_run.json").read_text())
    client = tracking.client(f"sqlite:///{Path(env['IPSR_HOME']) / 'mlflow.db'}")
    losses = client.get_metric_history(record["mlflow_run_id"], "loss/total")
    first = min(m.timestamp for m in losses) / 1000
    throughput = [m.value for m in client.get_metric_history(record["mlflow_run_id"], "throughput/img_per_s")]
    distinct = [m.value for m in client.get_metric_history(record["mlflow_run_id"], "batch/distinct_identities")]
    return {
        "train_wall_s": round(time.time() - start, 1),
        "time_to_first_step_s": round(first - start, 1),
        "train_img_s_median": round(sorted(throughput)[len(throughput) // 2], 2),
        "distinct_identities_per_16": round(sum(distinct) / len(distinct), 2),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["images"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["preprocess_wall_s"] for r in rows], "o-", label="preprocess wall")
    left.plot(n, [r["list_s"] for r in rows], "o-", label="listing")
    left.plot(n, [r["time_to_first_step_s"] for r in rows], "o-", label="train: time to first step")
    left.set(xlabel="images", ylabel="seconds", title="time")
    right.plot(n, [r["driver_peak_rss_mb"] for r in rows], "o-", label="preprocess driver peak RSS")
    right.plot(n, [r["object_store_peak_mb"] for r in rows], "o-", label="object store peak")
    if all("object_store_peak_mb_unbudgeted" in r for r in rows):  # a merged table: before the object-store budget
        right.plot(n, [r["object_store_peak_mb_unbudgeted"] for r in rows], "x--", label="object store peak, no budget")
    right.set(xlabel="images", ylabel="MiB", title="memory")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(rows: list[dict]) -> str:
    cols = [
        "images",
        "identities",
        "list_s",
        "preprocess_wall_s",
        "steady_img_s",
        "driver_peak_rss_mb",
        "object_store_peak_mb",
        "output_mb",
        "shards",
        "manifest_kb",
        "ingest_img_s_per_core",
        "time_to_first_step_s",
        "train_img_s_median",
        "distinct_identities_per_16",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,50000,100000")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ipsr-rehearsal"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "rehearsal")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ingest", type=int, default=6400, help="faces the data-only ingest measures")
    ap.add_argument("--stages", default="preprocess,ingest,train", help="which measurements (a rerun of one)")
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    home = args.work / "home"
    (home / "weights").mkdir(parents=True, exist_ok=True)
    for f in (Path.home() / ".cache" / "ipsr" / "weights").glob("*"):
        if not (home / "weights" / f.name).exists():
            (home / "weights" / f.name).symlink_to(f)
    os.environ["IPSR_HOME"] = str(home)
    # No dashboard: it and its agents cost 7-9 % of the rate on 2 cores.
    context = ray.init(include_dashboard=False, log_to_driver=False)
    cpus = ray.cluster_resources()["CPU"]
    env = dict(os.environ, RAY_ADDRESS=context.address_info["gcs_address"], IPSR_HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        src, out = args.work / f"src-{n}", args.work / f"out-{n}"
        if not (src / "train_list.txt").exists():
            print(f"[{n}] synthesising …", file=sys.stderr)
            synthesize(str(src), n, per_identity=PER_IDENTITY)
        row = {"images": n, "identities": -(-n // PER_IDENTITY)}
        stages = args.stages.split(",")
        if "preprocess" in stages:
            print(f"[{n}] preprocess …", file=sys.stderr)
            row |= preprocess(src, out, env)
        if "ingest" in stages:
            print(f"[{n}] ingest …", file=sys.stderr)
            row |= ingest(out, args.ingest, cpus)
        if "train" in stages:
            print(f"[{n}] train …", file=sys.stderr)
            row |= train(out, f"rehearsal-{n}-{int(time.time())}", args.steps, env)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "rows": rows}
        (args.out / "rehearsal.json").write_text(json.dumps(meta, indent=2))
        (args.out / "rehearsal.md").write_text(markdown(rows))
        if set(stages) == {"preprocess", "ingest", "train"}:
            plot(rows, args.out / "rehearsal.png")
    print(markdown(rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
