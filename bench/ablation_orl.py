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
import subprocess
import sys
import time
from pathlib import Path

from ipsr_model.metrics import mcnemar_exact
from jobs.evaluate import format_cell, format_seed_cell

HERE = Path(__file__).resolve().parent
SIZES = "7x6,11x8,16x12,16x16,21x15,32x32"
UNSEEN = "s3[1-9],s40"
# arm key -> (table label, train_orl.py flags, seeds). DEFAULT and PIXEL get three seeds (the minimum).
ARMS = {
    "dist_res_jit": ("Eq. 2 + residual + view jitter (default)", ["--jitter", "0.05"], (0, 1, 2)),
    "none_res": ("pixel only + residual", ["--embedding-loss", "none"], (0, 1, 2)),
    "dist_res": ("Eq. 2 + residual", [], (0,)),
    "dist_res_jit_wu": (
        "Eq. 2 + residual + view jitter, 50 warm-up steps", ["--jitter", "0.05", "--warmup-steps", "50"], (0,)
    ),
    "dist_res_jit_b50": ("Eq. 2 + residual + view jitter, β = 50", ["--jitter", "0.05", "--beta", "50"], (0,)),
    "mse_res": ("per-element MSE + residual", ["--embedding-loss", "mse"], (0, 1, 2)),
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
    """One `ipsr evaluate` pass (its own functions, no MLflow) over every run, each arm a seed group."""
    from ipsr_platform.config import EvaluateConfig
    from ipsr_platform.scoring import score
    from jobs.evaluate import build_protocol, build_recognizers, load_methods, load_models, seed_table, statistics

    config = EvaluateConfig(data=str(args.data), protocol="folder", identities=UNSEEN, sizes=SIZES)
    protocol = build_protocol(config)
    specs = [f"{key}={path(args, key, seed)}" for key, (_, _, seeds) in ARMS.items() for seed in seeds]
    methods = load_methods(protocol, load_models(specs))
    ranks, _ = score(protocol, methods, build_recognizers(config))
    columns = [c.name for c in protocol.columns]
    out: dict = {"columns": columns, "probes": len(protocol.columns[0].labels), "recognizers": {}}
    for rec in config.recognizers:
        cells = statistics(ranks, rec, methods, columns)
        versus = {  # the default against pixel-only, seed i against seed i, on the same probes
            c: [mcnemar_exact(ranks[rec, f"{DEFAULT}.{i}", c] == 0, ranks[rec, f"{PIXEL}.{i}", c] == 0)
                for i in range(1, 1 + min(len(ARMS[DEFAULT][2]), len(ARMS[PIXEL][2])))]
            for c in columns
        }  # fmt: skip
        out["recognizers"][rec] = {"cells": cells, "groups": seed_table(cells, methods, columns), "default_vs_pixel": versus}
    return out


def markdown(result: dict) -> str:
    columns = result["columns"]
    lines = [
        f"Unseen ORL s31–s40, {result['probes']} probes per size. Cell: rank-1 ±half-width of its 95 % Wilson "
        "interval for bicubic and one-seed arms; mean ± std over seeds for three-seed arms. `*` better / `†` worse "
        "than bicubic on the same probes, exact McNemar p < 0.05 (in *every* seed for three-seed arms); all "
        "p-values in ablation.json.", "",
    ]  # fmt: skip
    for rec, block in result["recognizers"].items():
        lines += [f"**{ {'facenet': 'FaceNet (in the loss)', 'sface': 'SFace (independent)'}[rec] }**", "",
                  "| method | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]  # fmt: skip
        for label in ("hr", "bicubic"):
            cells = block["cells"][label]
            lines.append(f"| {label} | – | " + " | ".join(format_cell(c["hits"] / c["n"], c) for c in cells.values()) + " |")
        for key, (title, _, seeds) in ARMS.items():
            if len(seeds) > 1:
                row = " | ".join(format_seed_cell(block["groups"][key][c]) for c in columns)
            else:
                cells = block["cells"][f"{key}.1"]
                row = " | ".join(format_cell(cells[c]["hits"] / cells[c]["n"], cells[c]) for c in columns)
            lines.append(f"| {title} | {len(seeds)} | {row} |")
        lines.append("")
        comparisons = [f"{c}: " + ", ".join(f"{a}/{b} p={p:.2g}" for a, b, p in block["default_vs_pixel"][c]) for c in columns]
        lines += ["Default vs pixel-only (probes only the default / only pixel-only gets right, p), seed by seed — "
                  + "; ".join(comparisons), ""]  # fmt: skip
    return "\n".join(lines)


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
