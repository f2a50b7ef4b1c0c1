"""The loss ablation on unseen identities of any `ipsr preprocess` output: which training objective to ship.

    python bench/ablation.py --data ALIGNED --work /tmp/ipsr-ablation            # train what is missing, then report
    python bench/ablation.py --data ALIGNED --work /tmp/ipsr-ablation --report   # tables from the stored results only

**Equal compute.** Every arm gets the same CPU budget (``--cpu-minutes`` of one core), turned into a number of
steps by the arm's cost per step, measured once on the quiet machine (``calibration.json``: each kind of step
timed in alternating rounds, one thread, process CPU time). Counting steps instead of stopping on the clock keeps
the budget fair when runs share the machine: on this 2-core VM two concurrent runs each do ~half the work per
CPU-second. Every arm × seed is one `bench/train_cpu.py` run on the dataset's ``train`` split, ``--parallel`` at a
time, which also saves its generator at step ``--equal-steps`` (the equal-steps view, the paper's claim).

**Scoring.** Each model is scored with `ipsr evaluate`'s own scorer (folder protocol: per identity the first face is
the gallery, every other face a probe; PSNR/SSIM against HR; the network alone, without the back-projection that
`ipsr evaluate` adds since, see `bench/back_projection.py`) on the ``val`` split with SFace (selection) and on the
``test`` split with SFace and FaceNet (the report). Models and logs stay in ``--work``; per-probe hits and fidelity
(no weights, no faces) go to ``--results``, small enough to commit, so a rerun — another day, another machine —
trains and scores only what is missing.

**The rule that picks the default**, fixed before any result was seen: among the arms at equal compute, the one with
the best mean SFace rank-1 over 7x6, 11x8 and 16x12 across seeds **on val**, excluding any arm that is
significantly worse than bicubic (exact McNemar p < 0.05) at any size in any seed on val. Test identities are
never trained on and never used to choose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean, median, stdev
from typing import NamedTuple

import torch

from ipsr_model.metrics import mcnemar_exact, wilson_interval

HERE = Path(__file__).resolve().parent
SIZES = ("7x6", "11x8", "16x12", "16x16", "21x15")
RULE_SIZES = ("7x6", "11x8", "16x12")
RECOGNIZERS = ("sface", "facenet")
PIXEL = "pixel"
TWO_NETS = "casia-webface-offline,ms-celeb-keras"
# Kinds of step, each timed by the calibration: bench/train_cpu.py flags.
STEP_KINDS = {
    "pixel": ["--embedding-loss", "none"],
    "mse": ["--embedding-loss", "mse"],
    "dist_jit": ["--embedding-loss", "distance", "--jitter", "0.05"],
    "mse_pre": ["--embedding-loss", "mse", "--hr-embeddings"],
    "mse_2nets": ["--embedding-loss", "mse", "--identity-weights", TWO_NETS],
}


class Arm(NamedTuple):
    label: str
    flags: list[str]
    plan: object  # (step costs in CPU-s, budget in CPU-s) -> (steps, pixel-only steps first)


# Every arm: width 16, batch 16, residual output, Adam 2e-4 (β1 0.5), random flips.
ARMS = {
    PIXEL: Arm("pixel only", STEP_KINDS["pixel"], lambda c, b: (b / c["pixel"], 0)),
    "mse": Arm("per-element MSE", STEP_KINDS["mse"], lambda c, b: (b / c["mse"], 0)),
    "dist_jit": Arm("Eq. 2 distance + view jitter", STEP_KINDS["dist_jit"], lambda c, b: (b / c["dist_jit"], 0)),
    "pre_mse": Arm("pixel pretraining (½ budget), then MSE", STEP_KINDS["mse"],
                   lambda c, b: (b / 2 / c["pixel"] + b / 2 / c["mse"], b / 2 / c["pixel"])),
    "mse_k4": Arm("MSE every 4th step, precomputed HR embeddings", [*STEP_KINDS["mse_pre"], "--identity-every", "4"],
                  lambda c, b: (4 * b / (3 * c["pixel"] + c["mse_pre"]), 0)),
    "mse_2nets": Arm("MSE through two nets (CASIA + MS-Celeb)", STEP_KINDS["mse_2nets"],
                     lambda c, b: (b / c["mse_2nets"], 0)),
    # Greyscale copies cost nothing per step: the pixel step's calibration holds.
    "pixel_grey": Arm("pixel only, 20 % greyscale copies", [*STEP_KINDS["pixel"], "--grey-p", "0.2"],
                      lambda c, b: (b / c["pixel"], 0)),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an ipsr preprocess output with train/val/test")
    parser.add_argument("--work", type=Path, required=True, help="models and training logs")
    parser.add_argument("--results", type=Path, default=None, help="default: bench/ablation/<data folder name>")
    parser.add_argument(
        "--cpu-minutes",
        type=float,
        default=20.0,
        help="the budget of every run, in quiet-machine CPU-minutes of one core",
    )
    parser.add_argument(
        "--equal-steps",
        type=int,
        default=None,
        help="the second view: every arm at this step (default: the steps the per-element MSE arm takes in the budget)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time (one thread each)")
    parser.add_argument("--orl", type=Path, default=None, help="ORL faces: also score the chosen arm on s1–s40")
    parser.add_argument("--orl-arms", default=None, help="the arms scored on ORL (default: the chosen one)")
    parser.add_argument(
        "--retrain-lost", action="store_true", help="train again the scored runs whose models are gone (for --orl)"
    )
    parser.add_argument("--report", action="store_true", help="no training or scoring: tables from --results")
    parser.add_argument("--train-only", action="store_true", help="train what is missing; score nothing")
    parser.add_argument(
        "--score-only",
        default=None,
        metavar="I/N",
        help="score shard I of N of the finished "
        "models that have no result, then exit (what the main process runs beside training)",
    )
    args = parser.parse_args(argv)
    args.results = args.results or HERE / "ablation" / args.data.resolve().name
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.arm_list = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    return args


def run_name(arm: str, seed: int, steps: int | None = None) -> str:
    return f"{arm}_s{seed}" + (f".step{steps}" if steps else "")


# ------------------------------------------------------------------------------------------------ calibration


def calibrate(args: argparse.Namespace, rounds: int = 3) -> dict[str, float]:
    """CPU-seconds per step of every kind, one thread, on this machine (run it with nothing else running): the
    kinds alternate in ``rounds`` so that a drift of the machine hits them alike; the median round counts."""
    path = args.results / "calibration.json"
    if path.exists():
        return json.loads(path.read_text())["cpu_s_per_step"]
    sys.path.insert(0, str(HERE))
    from train_cpu import Trainer
    from train_cpu import parse_args as train_args

    print("calibrating the step costs (keep the machine otherwise idle)", flush=True)
    out = str(args.work / "calibration.pt")  # never written; its folder holds the mirrored-embedding cache
    trainers = {
        kind: Trainer.build(train_args(["--data", str(args.data), "--out", out, *flags]))
        for kind, flags in STEP_KINDS.items()
    }
    samples: dict[str, list[float]] = {kind: [] for kind in trainers}
    for r in range(rounds + 1):  # round 0 warms up
        for kind, trainer in trainers.items():
            n = 12 if kind == "pixel" else 4
            cpu0 = time.process_time()
            for i in range(n):
                trainer.step(i)
            if r:
                samples[kind].append((time.process_time() - cpu0) / n)
    costs = {kind: median(values) for kind, values in samples.items()}
    _write_json(
        path,
        {
            "cpu_s_per_step": costs,
            "rounds": samples,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread, batch 16, width 16",
        },
    )
    return costs


def plan(args: argparse.Namespace, arm: str, costs: dict[str, float]) -> tuple[int, int]:
    """(steps of the equal-compute run, pixel-only steps first) for ``arm``."""
    steps, pixel_steps = ARMS[arm].plan(costs, args.cpu_minutes * 60)
    return round(steps), round(pixel_steps)


# --------------------------------------------------------------------------------------------------- training


def train_and_score(args: argparse.Namespace) -> None:
    """Train every (arm, seed) whose run is missing, ``--parallel`` at a time, and score finished models in a
    subprocess beside them (then, once training is done, in ``--parallel`` subprocesses), so no core waits."""
    costs = calibrate(args)
    todo = [
        (arm, seed)
        for seed in args.seed_list
        for arm in args.arm_list
        if not (args.work / f"{run_name(arm, seed)}.json").exists()  # the log is written last: a whole run
        and (args.retrain_lost or not (args.results / f"{run_name(arm, seed)}.json").exists())
    ]  # scored before, models since lost: trained again only when a check needs the weights (--orl)
    trainers: list[tuple[subprocess.Popen, str]] = []
    scorers: list[tuple[subprocess.Popen, str]] = []
    while todo or trainers or scorers or (not args.train_only and unscored(args)):
        while todo and len(trainers) < args.parallel:
            trainers.append(start_training(args, *todo.pop(0), costs))
        if not args.train_only and not scorers and unscored(args):
            shards = 1 if todo or trainers else args.parallel  # the cores training leaves free
            scorers += [start_scoring(args, i, shards) for i in range(shards)]
        time.sleep(5)
        for group in (trainers, scorers):
            for proc, name in list(group):
                if proc.poll() is not None:
                    group.remove((proc, name))
                    if proc.returncode:
                        raise SystemExit(f"error: {name} failed (exit {proc.returncode}); see its log in {args.work}")


def start_training(args: argparse.Namespace, arm: str, seed: int, costs: dict) -> tuple[subprocess.Popen, str]:
    steps, pixel_steps = plan(args, arm, costs)
    out = args.work / f"{run_name(arm, seed)}.pt"
    cmd = [sys.executable, str(HERE / "train_cpu.py"), "--data", str(args.data), "--seed", str(seed),
           "--max-steps", str(max(steps, args.equal_steps)), "--pixel-steps", str(pixel_steps),
           "--save-at", f"{steps},{args.equal_steps}", "--out", str(out), *ARMS[arm].flags]  # fmt: skip
    print(f"training {out.name}: {steps} steps ({pixel_steps} pixel-only first)", flush=True)
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent), out.name


def start_scoring(args: argparse.Namespace, shard: int, shards: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--data", str(args.data), "--work", str(args.work), "--results",
           str(args.results), "--seeds", args.seeds, "--arms", args.arms, "--equal-steps", str(args.equal_steps),
           "--score-only", f"{shard}/{shards}"]  # fmt: skip
    log = args.work / f"scoring-{shard}of{shards}.log"
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent), log.name


def _die_with_parent() -> None:
    """In the child: a killed ablation takes its runs and scorers with it — an orphan would go on writing a run
    that the rerun trains again into the same file."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------------------------------------- scoring


class View(NamedTuple):
    """What one scoring pass measures: a split of the dataset, with which recognizers, at which sizes."""

    split: str
    recognizers: tuple[str, ...]
    sizes: tuple[str, ...]


# Recognizer time is the cost here (FaceNet ~85 ms and SFace ~60 ms of one core per face): val, which only selects,
# and the equal-steps view are scored with the referee alone, the latter at the rule's sizes.
VIEWS = {
    "val": View("val", ("sface",), SIZES),
    "test": View("test", RECOGNIZERS, SIZES),
    "test_steps": View("test", ("sface",), RULE_SIZES),
    "orl": View("all", RECOGNIZERS, SIZES),
}
STEPS_ARMS = (PIXEL, "mse", "dist_jit", "mse_k4", "mse_2nets")  # pre_mse at the equal step is still pretraining


class Scorer:
    """One view's protocol and recognizers, built once per process; ``fingerprint`` pins the faces."""

    def __init__(self, data: Path, view: View, identities: str | None = None, facenet: str | None = None):
        from ipsr_platform.config import EvaluateConfig
        from jobs.evaluate import build_protocol, build_recognizers

        torch.set_num_threads(1)
        config = EvaluateConfig(
            data=str(data),
            protocol="folder",
            split=view.split,
            sizes=",".join(view.sizes),
            identities=identities,
            recognizers=",".join(view.recognizers),
            **({"identity_weights": facenet} if facenet else {}),
        )
        self.protocol = build_protocol(config)
        self.recognizers = build_recognizers(config)
        digest = hashlib.sha256(self.protocol.gallery.numpy().tobytes())
        digest.update(self.protocol.columns[0].images.numpy().tobytes())
        self.fingerprint = f"{self.protocol.note} | faces sha256 {digest.hexdigest()[:16]}"

    def __call__(self, methods) -> dict[str, dict]:
        """label → {recognizer: {size: '0110…' rank-1 hit per probe}, psnr/ssim: {size: mean}}."""
        from ipsr_platform.scoring import score

        ranks, _, quality = score(self.protocol, methods, self.recognizers, progress=False)
        sizes = [c.name for c in self.protocol.columns]
        out = {}
        for method in methods:
            row = out[method.label] = {"protocol": self.fingerprint}
            for rec in self.recognizers:
                row[rec] = {
                    s: "".join("1" if r == 0 else "0" for r in ranks[rec, method.label, s].tolist()) for s in sizes
                }
            if (method.label, sizes[0]) in quality:
                row["psnr"] = {s: float(quality[method.label, s][0].mean()) for s in sizes}
                row["ssim"] = {s: float(quality[method.label, s][1].mean()) for s in sizes}
        return out


_SCORERS: dict[str, Scorer] = {}


def scorer(args: argparse.Namespace, view: str) -> Scorer:
    if view not in _SCORERS:
        data, identities = (args.orl, "s*") if view == "orl" else (args.data, None)
        _SCORERS[view] = Scorer(data, VIEWS[view], identities)
    return _SCORERS[view]


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def score_baselines(args: argparse.Namespace, view: str) -> dict:
    """hr and bicubic of one view (the equal-steps view reads the test baselines)."""
    from ipsr_platform.scoring import BICUBIC, HR, Method

    view = "test" if view == "test_steps" else view
    path = args.results / f"baselines.{view}.json"
    if not path.exists():
        _write_json(path, scorer(args, view)([Method(HR), Method(BICUBIC)]))
    return json.loads(path.read_text())


def candidates(args: argparse.Namespace) -> list[tuple[str, str, int, bool]]:
    """(result name, arm, seed, equal steps?) of every model the ablation scores, in a fixed order: each seed's
    equal-compute models before its equal-steps snapshots."""
    return [
        (run_name(arm, seed, args.equal_steps if equal else None), arm, seed, equal)
        for seed in args.seed_list
        for equal in (False, True)
        for arm in args.arm_list
        if not (equal and arm not in STEPS_ARMS)
    ]


def unscored(args: argparse.Namespace, shard: tuple[int, int] = (0, 1)) -> list[tuple[str, str, int, bool]]:
    """The candidates of ``shard`` (i of n) whose run has finished and that have no result yet."""
    i, n = shard
    return [
        c
        for k, c in enumerate(candidates(args))
        if k % n == i
        and not (args.results / f"{c[0]}.json").exists()
        and (args.work / f"{run_name(c[1], c[2])}.json").exists()
    ]


def score_missing(args: argparse.Namespace, shard: tuple[int, int] = (0, 1)) -> None:
    """Score the finished models of ``shard`` that have no result yet (those finished when it starts: the main
    process starts the next pass, with as many shards as cores are free)."""
    from ipsr_platform.models import load_generator
    from ipsr_platform.scoring import Method

    for name, arm, seed, equal_steps in unscored(args, shard):
        run = json.loads((args.work / f"{run_name(arm, seed)}.json").read_text())
        steps = args.equal_steps if equal_steps else int(run["args"]["save_at"].split(",")[0])
        model = load_generator(run["saved"][str(steps)])
        payload = {"arm": arm, "seed": seed, "equal_steps": equal_steps, "steps": steps,
                   "pixel_steps": run["args"]["pixel_steps"], "args": run["args"],
                   "identity_steps": sum(1 for i in range(steps) if _identity_step(run["args"], i)),
                   "cpu_s_run": run["cpu_s"]}  # fmt: skip
        for view in ("test_steps",) if equal_steps else ("val", "test"):
            score_baselines(args, view)
            payload[view] = scorer(args, view)([Method(name, model.module, name)])[name]
        _write_json(args.results / f"{name}.json", payload)
        print(f"scored {name}", flush=True)


def _identity_step(run_args: dict, i: int) -> bool:
    """Whether step i of a run had the identity term (train_cpu.Trainer.with_identity)."""
    return (
        run_args["embedding_loss"] != "none"
        and i >= run_args["pixel_steps"]
        and ((i - run_args["pixel_steps"]) % run_args["identity_every"] == 0)
    )


# ----------------------------------------------------------------------------------------------------- report


def _hits(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


def load_results(args: argparse.Namespace, equal_steps: bool) -> dict[str, list[dict]]:
    """arm → its seeds' results (budget runs, or the equal-steps snapshots), in seed order; complete arms only."""
    out = {}
    for arm in args.arm_list:
        runs = [_load_result(args, arm, seed, equal_steps) for seed in args.seed_list]
        if all(runs):
            out[arm] = runs
    return out


def _load_result(args: argparse.Namespace, arm: str, seed: int, equal_steps: bool) -> dict | None:
    """One stored result. At equal steps, a budget run that ended at that very step (the MSE arm's) is its own
    snapshot: its test hits at the view's recognizers and sizes, the same bits a snapshot's scoring gives."""
    path = args.results / f"{run_name(arm, seed, args.equal_steps if equal_steps else None)}.json"
    if path.exists():
        return json.loads(path.read_text())
    budget = args.results / f"{run_name(arm, seed)}.json"
    if not (equal_steps and arm in STEPS_ARMS and budget.exists()):
        return None
    run = json.loads(budget.read_text())
    if run["steps"] != args.equal_steps:
        return None
    view = VIEWS["test_steps"]
    test = run["test"]
    keep = {rec: {s: test[rec][s] for s in view.sizes} for rec in view.recognizers}
    fidelity = {k: {s: test[k][s] for s in view.sizes} for k in ("psnr", "ssim")}
    return {**run, "equal_steps": True, "test_steps": {"protocol": test["protocol"], **keep, **fidelity}}


def compare(a: str, b: str) -> dict:
    """Paired test of two hit strings on the same probes: `*` a better, `†` a worse (exact McNemar p < 0.05)."""
    only_a, only_b, p = mcnemar_exact(_hits(a), _hits(b))
    return {"only_a": only_a, "only_b": only_b, "p": p, "sign": "*" if p < 0.05 and only_a > only_b else
            "†" if p < 0.05 else ""}  # fmt: skip


def arm_cells(runs: list[dict], view: str, rec: str, baseline: dict, pixel: list[dict] | None) -> dict[str, dict]:
    """size → mean/std rank-1 over seeds, each seed's test against bicubic (and pixel-only, seed against seed)."""
    cells = {}
    for size, _ in runs[0][view][rec].items():
        bits = [r[view][rec][size] for r in runs]
        rates = [b.count("1") / len(b) for b in bits]
        vs_bicubic = [compare(b, baseline["bicubic"][rec][size]) for b in bits]
        signs = {c["sign"] for c in vs_bicubic}
        cells[size] = {
            "mean": fmean(rates),
            # one seed: its own 95 % Wilson half-width, since a std of one number says nothing
            "std": stdev(rates) if len(rates) > 1 else _half_width(bits[0]),
            "seeds": rates,
            "vs_bicubic": vs_bicubic,
            "verdict": signs.pop() if len(signs) == 1 else "",
            "vs_pixel": [compare(b, p[view][rec][size]) for b, p in zip(bits, pixel)] if pixel else None,
        }
    return cells


def choose(arms: dict[str, list[dict]], baseline: dict) -> tuple[str | None, list[str]]:
    """The pre-registered rule on val: the best mean SFace rank-1 over RULE_SIZES among the arms that are never
    significantly worse than bicubic at any size in any seed."""
    lines, best = [], (None, -1.0)
    for arm, runs in arms.items():
        cells = arm_cells(runs, "val", "sface", baseline, None)
        worse = [
            f"{s} seed {r['seed']}" for s, c in cells.items() for r, t in zip(runs, c["vs_bicubic"]) if t["sign"] == "†"
        ]
        value = fmean(cells[s]["mean"] for s in RULE_SIZES)
        lines.append(
            f"| {ARMS[arm][0]} | {value:.4f} | {'excluded: worse at ' + ', '.join(worse) if worse else 'eligible'} |"
        )
        if not worse and value > best[1]:
            best = (arm, value)
    return best[0], lines


def _cell(cell: dict) -> str:
    return f"{cell['mean']:.3f} ±{cell['std']:.3f}{cell['verdict']}"


def _half_width(bits: str) -> float:
    low, high = wilson_interval(bits.count("1"), len(bits))
    return (high - low) / 2


def _baseline_cell(bits: str) -> str:
    return f"{bits.count('1') / len(bits):.3f} ±{_half_width(bits):.3f}"


TITLES = {"sface": "SFace (independent: never in training or selection)", "facenet": "FaceNet (CASIA, in the loss)"}


def rank1_tables(arms: dict[str, list[dict]], view: str, baseline: dict) -> list[str]:
    lines = []
    for rec in next(iter(arms.values()))[0][view]:
        if rec not in RECOGNIZERS:
            continue
        sizes = list(next(iter(arms.values()))[0][view][rec])
        lines += [
            f"**{TITLES[rec]}**",
            "",
            "| method | steps | " + " | ".join(sizes) + " |",
            "|---|---:|" + "---:|" * len(sizes),
        ]
        for label in ("hr", "bicubic"):
            lines.append(
                f"| {label} | – | " + " | ".join(_baseline_cell(baseline[label][rec][s]) for s in sizes) + " |"
            )
        for arm, runs in arms.items():
            cells = arm_cells(runs, view, rec, baseline, None)
            steps = "–".join(str(v) for v in sorted({min(r["steps"] for r in runs), max(r["steps"] for r in runs)}))
            lines.append(f"| {ARMS[arm][0]} | {steps} | " + " | ".join(_cell(cells[s]) for s in sizes) + " |")
        lines.append("")
    return lines


def fidelity_table(arms: dict[str, list[dict]], view: str, baseline: dict) -> list[str]:
    def cell(rows: list[dict], size: str) -> str:
        return f"{fmean(r['psnr'][size] for r in rows):.2f} / {fmean(r['ssim'][size] for r in rows):.3f}"

    sizes = list(baseline["bicubic"]["psnr"])
    lines = [
        "| method | " + " | ".join(sizes) + " |",
        "|---|" + "---:|" * len(sizes),
        "| bicubic | " + " | ".join(cell([baseline["bicubic"]], s) for s in sizes) + " |",
    ]
    for arm, runs in arms.items():
        lines.append(f"| {ARMS[arm][0]} | " + " | ".join(cell([r[view] for r in runs], s) for s in sizes) + " |")
    return lines + [""]


def per_seed_tests(arms: dict[str, list[dict]], view: str, baseline: dict) -> list[str]:
    """Each seed's p against bicubic per size, and against pixel-only (seed i vs seed i) at 11x8 and 16x12."""
    pixel = arms.get(PIXEL)
    recognizers = [r for r in next(iter(arms.values()))[0][view] if r in RECOGNIZERS]
    sizes = list(next(iter(arms.values()))[0][view][recognizers[0]])
    versus = " | ".join(f"{s} vs bicubic" for s in sizes)
    lines = ["| arm | recognizer | " + versus + " | 11x8 vs pixel | 16x12 vs pixel |",
             "|---|---|" + "---|" * (len(sizes) + 2)]  # fmt: skip
    for arm, runs in arms.items():
        for rec in recognizers:
            cells = arm_cells(runs, view, rec, baseline, pixel if arm != PIXEL else None)

            def fmt(tests: list[dict]) -> str:
                return " ".join(f"{t['p']:.2g}{t['sign']}" for t in tests)

            versus = [fmt(cells[s]["vs_pixel"]) if cells[s]["vs_pixel"] else "–" for s in ("11x8", "16x12")]
            lines.append(
                f"| {ARMS[arm][0]} | {rec} | "
                + " | ".join(fmt(cells[s]["vs_bicubic"]) for s in sizes)
                + " | "
                + " | ".join(versus)
                + " |"
            )
    return lines + [""]


def report(args: argparse.Namespace) -> str:
    budget, steps = load_results(args, False), load_results(args, True)
    if not budget:
        raise SystemExit(f"error: no arm has all seeds {args.seeds} scored in {args.results}")
    test, val = score_baselines(args, "test"), score_baselines(args, "val")
    chosen, rule = choose(budget, val)
    some = next(iter(budget.values()))[0]
    lines = [f"Data: `{args.data}`. Test: {some['test']['protocol']}. Val: {some['val']['protocol']}.",
             f"Seeds {args.seeds}; {args.cpu_minutes:g} CPU-min per run; equal steps = {args.equal_steps}.", "",
             "### Selection on val (the rule fixed before the results; SFace)", "",
             "| arm | mean SFace rank-1, " + ", ".join(RULE_SIZES) + " | |", "|---|---:|---|", *rule, "",
             f"**Chosen: {ARMS[chosen][0] if chosen else 'none (every arm is worse than bicubic somewhere)'}**", "",
             "### Equal compute — test identities", "",
             "Rank-1, mean ± std over seeds (one seed: ± half-width of its 95 % Wilson interval); `*`/`†` "
             "better/worse than bicubic in every seed (exact McNemar p < 0.05); hr/bicubic ± half-width of the 95 % "
             "Wilson interval.", ""]  # fmt: skip
    lines += rank1_tables(budget, "test", test)
    lines += ["PSNR dB / SSIM against HR (test, mean over probes and seeds):", ""] + fidelity_table(
        budget, "test", test
    )
    lines += ["Per-seed exact McNemar p (test; `*` better, `†` worse), seeds in order:", ""]
    lines += per_seed_tests(budget, "test", test)
    if steps:
        lines += [f"### Equal steps ({args.equal_steps}) — test identities", ""] + rank1_tables(
            steps, "test_steps", test
        )
        lines += per_seed_tests(steps, "test_steps", test)
    for arm in (args.orl_arms.split(",") if args.orl_arms else [chosen] if chosen else []) if args.orl else []:
        lines += orl_check(args, arm)
    return "\n".join(lines)


def orl_check(args: argparse.Namespace, arm: str) -> list[str]:
    """The chosen arm, trained on CelebA only, on ORL s1–s40 (every non-gallery face a probe)."""
    from ipsr_platform.models import load_generator
    from ipsr_platform.scoring import BICUBIC, HR, Method

    path = args.results / f"orl.{arm}.json"
    scored = json.loads(path.read_text()) if path.exists() else {}
    if missing := [n for n in (run_name(arm, seed) for seed in args.seed_list) if n not in scored]:  # seeds added later
        methods = [Method(n, load_generator(str(args.work / f"{n}.pt")).module, n) for n in missing]
        scored = scorer(args, "orl")([Method(HR), Method(BICUBIC), *methods]) | scored
        _write_json(path, scored)
    budget = [json.loads((args.results / f"{run_name(arm, seed)}.json").read_text()) for seed in args.seed_list]
    runs = [{"orl": scored[run_name(arm, r["seed"])], "seed": r["seed"], "steps": r["steps"]} for r in budget]
    lines = [f"### {ARMS[arm][0]} (trained on CelebA only) on ORL s1–s40: {scored['bicubic']['protocol']}", ""]
    return (
        lines
        + rank1_tables({arm: runs}, "orl", scored)
        + ["PSNR dB / SSIM against HR (ORL):", ""]
        + fidelity_table({arm: runs}, "orl", scored)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.report and not (args.results / "calibration.json").exists():  # a report never calibrates (minutes)
        raise SystemExit(f"error: {args.results} has no calibration.json: --report reads an ablation's results")
    args.equal_steps = args.equal_steps or plan(args, "mse", calibrate(args))[0]
    if args.score_only:
        score_missing(args, tuple(int(v) for v in args.score_only.split("/")))
        return
    if not args.report:
        train_and_score(args)
    if args.train_only:
        return
    text = report(args)
    (args.results / "ablation.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
