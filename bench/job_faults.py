"""Job faults, counted (issue #28): `ipsr preprocess` and `ipsr enrol` with their processes SIGKILLed mid-run.

    .venv/bin/python bench/job_faults.py [--data ../shared/data/att_faces] [--identities 40] [--kills 4]

Four runs of each job on the same identity folders: a clean one (the reference), one whose Ray Data actors are
SIGKILLed every ``--every`` seconds while they work (model actors, readers, writers in turn: what a crash or the OOM
killer does), and one whose driver is SIGKILLed mid-run, followed by a plain rerun. Checked after each: every input
accounted for exactly once (aligned or rejected with the clean run's reason; enrolled once by ``image_id``), no
duplicate row, the output readable, the same faces as the clean run. Prints one Markdown row per run (RESULTS.md's
fault table); exit 1 if a check failed. Training's faults (a killed worker, a killed driver) are tests in
tests/test_train.py. ``tests/test_preprocess.py`` kills actors of a small run with the same ``Killer``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.procs import titled  # noqa: E402 - after the path insert

TIMEOUT_S = 900  # any one run; a run that hangs is a failure, not a wait


class Killer(threading.Thread):
    """SIGKILLs one process whose title holds ``targets[i % len(targets)]`` (``MapBatches(Aligner)``, …) every
    ``every_s`` seconds once ``armed()`` is true, ``kills`` times at most. A process at work (title ending in
    ``.submit``) is preferred to an idle one, so the kill cuts a batch in flight."""

    def __init__(self, targets: list[str], kills: int, every_s: float, armed: Callable[[], bool] = lambda: True):
        super().__init__(daemon=True)
        self.targets, self.kills, self.every_s, self.armed = targets, kills, every_s, armed
        self.done: list[tuple[float, str, str]] = []  # (when, target, the title it had: what it was doing)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.done) < self.kills:
            if not self.armed():
                self.stopping.wait(0.05)
                continue
            target = self.targets[len(self.done) % len(self.targets)]
            if self._kill_one(target, patience_s=2.0):
                self.stopping.wait(self.every_s)

    def _kill_one(self, target: str, patience_s: float) -> bool:
        deadline = time.monotonic() + patience_s
        while not self.stopping.is_set():
            found = titled(f"ray::MapWorker({target})")
            busy = [pid for pid, title in found.items() if title.endswith(".submit")]
            pids = busy or (list(found) if time.monotonic() > deadline else [])
            if pids:
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.done.append((time.monotonic(), target, found[pids[0]]))
                return True
            self.stopping.wait(0.02)
        return False

    def stop(self) -> list[tuple[float, str, str]]:
        self.stopping.set()
        self.join(timeout=10)
        return self.done


def kill_driver_when(cmd: list[str], ready: Callable[[], bool], env: dict) -> float:
    """Start ``cmd`` (a job's driver), SIGKILL it as soon as ``ready()``; the seconds it ran. Raises if it ends
    first."""
    began = time.monotonic()
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not ready():
            if driver.poll() is not None:
                raise RuntimeError(f"the driver ended before the kill: {driver.stdout.read().decode()[-2000:]}")
            if time.monotonic() - began > TIMEOUT_S:
                raise RuntimeError(f"not ready within {TIMEOUT_S} s")
            time.sleep(0.05)
    finally:
        driver.kill()
        driver.wait(timeout=60)
    return time.monotonic() - began


# --- preprocess -------------------------------------------------------------------------------------------------


def preprocess_outcome(src: Path, out: Path) -> dict:
    """A committed preprocess output, checked against its input tree: source → reason ('' = aligned); raises
    AssertionError naming the first broken promise."""
    import pyarrow.parquet as pq

    listed = sorted(str(p) for p in src.glob("*/*") if p.is_file())
    assert (out / "_SUCCESS").exists() and not (out / "_temporary").exists(), f"{out} not committed cleanly"
    faces = pq.read_table(out / "data", columns=["source", "image"])  # every shard readable, pixels included
    rejects = pq.read_table(out / "rejects.parquet", columns=["source", "reason"])
    sources = faces["source"].to_pylist() + rejects["source"].to_pylist()
    twice = [s for s, n in Counter(sources).items() if n > 1]
    assert not twice, f"{len(twice)} input(s) twice in the output, e.g. {twice[0]}"
    assert sorted(sources) == listed, f"{len(set(listed) - set(sources))} input(s) missing from the output"
    reason = dict.fromkeys(faces["source"].to_pylist(), "")
    reason.update(zip(rejects["source"].to_pylist(), rejects["reason"].to_pylist()))
    return {"reason": reason}


def same_faces(a: dict, b: dict) -> str:
    """'' when ``b`` aligned and rejected exactly what ``a`` did (pixels may differ: MTCNN on another batch
    composition can move a box by a pixel); else what differs."""
    if a["reason"] != b["reason"]:
        diff = [s for s in a["reason"] if a["reason"][s] != b["reason"].get(s)]
        return f"{len(diff)} input(s) with another outcome than the clean run, e.g. {diff[:1]}"
    return ""


def preprocess_runs(src: Path, work: Path, kills: int, every_s: float) -> list[dict]:
    from ipsr_platform.config import PreprocessConfig
    from jobs.preprocess import run

    cfg = dict(input=str(src), batch_size=8, rows_per_shard=32)
    rows = []
    t = time.monotonic()
    run(PreprocessConfig(output=str(work / "clean"), **cfg))
    clean = preprocess_outcome(src, work / "clean")
    rows.append(_row("preprocess", "none (reference)", [], time.monotonic() - t, clean, clean))

    out = work / "actors"
    killer = Killer(["MapBatches(Aligner)", "MapBatches(Writer)", "MapBatches(Aligner)", "MapBatches(Reader)"],
                    kills, every_s, armed=lambda: any(out.glob("_temporary/*/*/part-*.parquet")))  # fmt: skip
    t = time.monotonic()
    killer.start()
    try:
        run(PreprocessConfig(output=str(out), **cfg))
    finally:
        done = killer.stop()
    outcome = _checked(lambda: preprocess_outcome(src, out))
    rows.append(_row("preprocess", "actors SIGKILLed", done, time.monotonic() - t, clean, outcome))

    out = work / "driver"
    env = dict(os.environ, RAY_ADDRESS=_gcs_address())
    flags = ["--input", str(src), "--output", str(out), "--batch-size", "8", "--rows-per-shard", "32"]
    t = time.monotonic()
    ran = kill_driver_when([sys.executable, "-m", "jobs.preprocess", *flags],
                           lambda: any(out.glob("_temporary/*/*/part-*.parquet")), env)  # fmt: skip
    run(PreprocessConfig(output=str(out), **cfg))
    outcome = _checked(lambda: preprocess_outcome(src, out))
    what = f"driver SIGKILLed after {ran:.0f} s (first shard written), then a rerun"
    rows.append(_row("preprocess", what, [], time.monotonic() - t, clean, outcome))
    return rows


# --- enrol ------------------------------------------------------------------------------------------------------


def enrol_outcome(store, gallery: str, listed: list[str], rejected: dict[str, int]) -> dict:
    """A gallery written by `ipsr enrol`, checked: each image_id at most once; enrolled + rejected = listed."""
    g = store.load(gallery)
    ids = g.image_ids.tolist()
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} image_id(s) twice in gallery {gallery}, e.g. {twice[0]}"
    assert set(ids) <= set(listed), f"gallery {gallery} holds faces that were not listed"
    assert len(ids) + sum(rejected.values()) == len(listed), (
        f"{len(listed)} listed, {len(ids)} enrolled + {sum(rejected.values())} rejected"
    )
    return {"reason": {i: "" for i in ids}, "embedding": dict(zip(ids, g.embeddings))}


def enrol_runs(src: Path, galleries: Path, kills: int, every_s: float) -> list[dict]:
    from ipsr_platform.config import EnrolConfig
    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage
    from jobs.enrol import run

    store = GalleryStore(str(galleries), Storage.from_env())
    listed = sorted(f"{p.parent.name}/{p.name}" for p in src.glob("*/*") if p.is_file())
    cfg = dict(input=str(src), galleries=str(galleries), batch_size=8, rows_per_segment=32,
               rejects=str(galleries.parent / "enrol-rejects.parquet"))  # fmt: skip
    rows = []

    t = time.monotonic()
    result = run(EnrolConfig(gallery="clean", **cfg))
    clean = enrol_outcome(store, "clean", listed, result.rejected)
    rows.append(_row("enrol", "none (reference)", [], time.monotonic() - t, clean, clean))

    killer = Killer(["MapBatches(Embedder)", "MapBatches(Embedder)", "MapBatches(Reader)"], kills, every_s,
                    armed=lambda: bool(store.listing("actors")[0]))  # fmt: skip
    t = time.monotonic()
    killer.start()
    try:
        result = run(EnrolConfig(gallery="actors", **cfg))
    finally:
        done = killer.stop()
    outcome = _checked(lambda: enrol_outcome(store, "actors", listed, result.rejected))
    rows.append(_row("enrol", "actors SIGKILLed", done, time.monotonic() - t, clean, outcome))

    env = dict(os.environ, RAY_ADDRESS=_gcs_address())
    flags = ["--input", str(src), "--gallery", "driver", "--galleries", str(galleries), "--batch-size", "8",
             "--rows-per-segment", "32", "--rejects", cfg["rejects"]]  # fmt: skip
    t = time.monotonic()
    ran = kill_driver_when([sys.executable, "-m", "jobs.enrol", *flags], lambda: bool(store.listing("driver")[0]), env)
    result = run(EnrolConfig(gallery="driver", **cfg))
    outcome = _checked(lambda: enrol_outcome(store, "driver", listed, result.rejected))
    what = f"driver SIGKILLed after {ran:.0f} s (first segment written), then a rerun"
    rows.append(_row("enrol", what, [], time.monotonic() - t, clean, outcome))
    return rows


# --- report -----------------------------------------------------------------------------------------------------


def _checked(outcome: Callable[[], dict]) -> dict | str:
    try:
        return outcome()
    except AssertionError as err:
        return str(err)


def _row(job: str, fault: str, kills: list, seconds: float, clean: dict, outcome: dict | str) -> dict:
    """One table row; ``outcome`` is a checked output, or the check's failure message."""
    problem = outcome if isinstance(outcome, str) else same_faces(clean, outcome)
    if not problem and "embedding" in clean:
        worst = max(abs(clean["embedding"][i] - outcome["embedding"][i]).max() for i in outcome["embedding"])
        problem = "" if worst < 1e-3 else f"embeddings differ from the clean run by up to {worst:.2g}"
    counts = Counter(outcome["reason"].values()) if isinstance(outcome, dict) else Counter()
    busy = sum(title.endswith(".submit") for _, _, title in kills)
    return {
        "job": job,
        "fault": fault,
        "kills": ", ".join(f"{n}× {t}" for t, n in Counter(t for _, t, _ in kills).items()) or "—",
        "kills_mid_batch": busy,
        "seconds": round(seconds, 1),
        "aligned_or_enrolled": counts.get("", 0),
        "rejected": sum(n for r, n in counts.items() if r),
        "problem": problem,
    }


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def markdown(rows: list[dict]) -> str:
    lines = ["| job | fault | kills (mid-batch) | s | aligned / enrolled | rejected | every input once, as clean |",
             "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['job']} | {r['fault']} | {r['kills']} ({r['kills_mid_batch']}) | {r['seconds']} "
            f"| {r['aligned_or_enrolled']} | {r['rejected']} | {r['problem'] or 'yes'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "att_faces")
    parser.add_argument("--identities", type=int, default=40, help="the first N identity folders")
    parser.add_argument("--kills", type=int, default=4, help="actor kills per faulted run")
    parser.add_argument("--every", type=float, default=4.0, help="seconds between actor kills")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="ipsr-job-faults-"))
    try:
        src = work / "src"
        for person in sorted(p for p in args.data.iterdir() if p.is_dir())[: args.identities]:
            shutil.copytree(person, src / person.name)
        from ipsr_platform import cluster

        cluster.connect()
        rows = preprocess_runs(src, work, args.kills, args.every)
        rows += enrol_runs(src, work / "galleries", args.kills, args.every)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows))
    sys.exit(1 if any(r["problem"] for r in rows) else 0)


if __name__ == "__main__":
    main()
