"""The loss / output ablation on unseen identities: train every arm on ORL s1–s30, score all on s31–s40.

    python bench/ablation_orl.py --data ../shared/data/att_faces --work /tmp/ipsr-ablation

Each arm × seed is one `bench/train_orl.py` run with the same CPU budget (`--cpu-minutes`, process CPU time, one
torch thread), `--parallel` at a time; finished runs (their .pt) are kept, so a rerun only trains what is missing.
Then one evaluation of every model with `ipsr evaluate`'s own code (folder protocol: gallery = each identity's
first image, the 9 others are probes, 90 in all; FaceNet and the independent SFace): rank-1 per size with its
95 % Wilson interval, mean ± std over seeds, an exact McNemar test of every run against bicubic on the same
probes, and of the chosen default against pixel-only, seed by seed. Writes `ablation.md` and `ablation.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics as stats
import subprocess
import sys
import time
from pathlib import Path

import torch

from ipsr_model.metrics import mcnemar_exact, wilson_interval

HERE = Path(__file__).resolve().parent
SIZES = "7x6,11x8,16x12,16x16,21x15,32x32"
UNSEEN = "s3[1-9],s40"
# arm key -> (table label, train_orl.py flags, seeds). DEFAULT and PIXEL get three seeds (the minimum).
ARMS = {
    "dist_res_jit": ("Eq. 2 + residual + view jitter (default)", ["--jitter", "0.05"], (0, 1, 2)),
    "none_res": ("pixel only + residual", ["--embedding-loss", "none"], (0, 1, 2)),
    "dist_res": ("Eq. 2 + residual", [], (0,)),
    "dist_res_jit_b50": ("Eq. 2 + residual + view jitter, β = 50", ["--jitter", "0.05", "--beta", "50"], (0,)),
    "mse_res": ("per-element MSE + residual", ["--embedding-loss", "mse"], (0,)),
    "dist_nores": ("Eq. 2, plain U-Net (paper)", ["--no-residual"], (0,)),
    "mse_nores": ("per-element MSE, plain U-Net (old default)", ["--embedding-loss", "mse", "--no-residual"], (0,)),
    "none_nores": ("pixel only, plain U-Net", ["--embedding-loss", "none", "--no-residual"], (0,)),
}
DEFAULT, PIXEL = "dist_res_jit", "none_res"


def train_all(args: argparse.Namespace) -> None:
    todo = [(key, seed) for key, (_, _, seeds) in ARMS.items() for seed in seeds if not path(args, key, seed).exists()]
    running: list[tuple[subprocess.Popen, str]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            key, seed = todo.pop(0)
            out = path(args, key, seed)
            cmd = [sys.executable, str(HERE / "train_orl.py"), "--data", str(args.data), "--cpu-minutes",
                   str(args.cpu_minutes), "--threads", "1", "--seed", str(seed), "--out", str(out), *ARMS[key][1]]  # fmt: skip
            log = open(out.with_suffix(".log"), "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out.name))
            print(f"training {out.name}", flush=True)
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                if proc.returncode:
                    raise SystemExit(f"error: {name} failed (exit {proc.returncode}); see its .log")


def path(args: argparse.Namespace, key: str, seed: int) -> Path:
    return args.work / f"{key}_s{seed}.pt"


def evaluate_all(args: argparse.Namespace) -> dict:
    from ipsr_platform.config import EvaluateConfig
    from ipsr_platform.models import load_generator
    from jobs.evaluate import BICUBIC, build_protocol, build_recognizers, evaluate, load_methods

    config = EvaluateConfig(data=str(args.data), protocol="folder", identities=UNSEEN, sizes=SIZES)
    protocol = build_protocol(config)
    runs = [(key, seed) for key, (_, _, seeds) in ARMS.items() for seed in seeds]
    loaded = [load_generator(str(path(args, key, seed))) for key, seed in runs]
    methods = load_methods(protocol, loaded)
    ranks, _ = evaluate(protocol, methods, build_recognizers(config))
    columns = [c.name for c in protocol.columns]
    hits = {k: (v == 0) for k, v in ranks.items()}
    out: dict = {"columns": columns, "probes": len(protocol.columns[0].labels), "recognizers": {}}
    for rec in config.recognizers:
        rows = {}
        for label in ("hr", BICUBIC):
            rows[label] = {c: cell([hits[rec, label, c]]) for c in columns}
        for key, (title, _, seeds) in ARMS.items():
            runs_hits = {c: [hits[rec, f"{key}_s{s}", c] for s in seeds] for c in columns}
            rows[key] = {c: cell(h, hits[rec, BICUBIC, c]) for c, h in runs_hits.items()}
            rows[key]["title"] = title
        versus = {
            c: [mcnemar_exact(hits[rec, f"{DEFAULT}_s{s}", c], hits[rec, f"{PIXEL}_s{s}", c])
                for s in ARMS[DEFAULT][2] if s in ARMS[PIXEL][2]]
            for c in columns
        }  # fmt: skip
        out["recognizers"][rec] = {"rows": rows, "default_vs_pixel": versus}
    return out


def cell(runs: list[torch.Tensor], bicubic: torch.Tensor | None = None) -> dict:
    """Rank-1 over seeds (mean, std), the Wilson interval of the pooled hits, McNemar vs bicubic per seed."""
    rates = [float(h.float().mean()) for h in runs]
    pooled = torch.cat(runs)
    result = {
        "rank1": stats.mean(rates), "std": stats.stdev(rates) if len(rates) > 1 else 0.0, "seeds": rates,
        "ci95": wilson_interval(int(pooled.sum()), len(pooled)),
    }  # fmt: skip
    if bicubic is not None:
        result["vs_bicubic"] = [mcnemar_exact(h, bicubic) for h in runs]
    return result


def markdown(result: dict) -> str:
    columns = result["columns"]
    lines = [
        f"Unseen ORL s31–s40, {result['probes']} probes per size. Cell: rank-1 (mean ± std over seeds when several) "
        "and the 95 % Wilson interval (of all seeds' probes pooled); `*` better / `†` worse than bicubic with exact "
        "McNemar p < 0.05 in *every* seed; p-values per seed in ablation.json.", "",
    ]  # fmt: skip
    for rec, block in result["recognizers"].items():
        lines += [f"**{ {'facenet': 'FaceNet (in the loss)', 'sface': 'SFace (independent)'}[rec] }**", "",
                  "| method | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]  # fmt: skip
        for key, row in block["rows"].items():
            title = row.get("title", key)
            n = len(row[columns[0]]["seeds"])
            lines.append(f"| {title} | {n} | " + " | ".join(format_cell(row[c]) for c in columns) + " |")
        lines.append("")
        comparisons = []
        for c in columns:
            tests = block["default_vs_pixel"][c]
            comparisons.append(f"{c}: " + ", ".join(f"{a}/{b} p={p:.3g}" for a, b, p in tests))
        lines += [f"Default vs pixel-only, probes only the default / only pixel-only gets right, per seed — "
                  + "; ".join(comparisons), ""]  # fmt: skip
    return "\n".join(lines)


def format_cell(cell: dict) -> str:
    low, high = cell["ci95"]
    text = f"{cell['rank1']:.3f}" + (f" ±{cell['std']:.3f}" if len(cell["seeds"]) > 1 else "")
    text += f" [{low:.2f}, {high:.2f}]"
    tests = cell.get("vs_bicubic", [])
    if tests and all(p < 0.05 for _, _, p in tests):
        better = all(a > b for a, b, _ in tests)
        worse = all(a < b for a, b, _ in tests)
        text += "*" if better else "†" if worse else ""
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ORL: att_faces/sN/K.pgm")
    parser.add_argument("--work", type=Path, required=True, help="models, logs and the tables go here")
    parser.add_argument("--cpu-minutes", type=float, default=10.0, help="CPU budget of every training run")
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time (one thread each)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_all(args)
    result = evaluate_all(args)
    (args.work / "ablation.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.work / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
