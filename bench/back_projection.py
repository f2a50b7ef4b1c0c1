"""Back-projection after the model (#25): does making the output agree with its LR input help recognition?

    python bench/back_projection.py --data /work/abl/celeba_aligned --split val --model /work/abl/runs/pixel_s0.pt \
        --out /tmp/bp/val_s0.json
    python bench/back_projection.py --report /tmp/bp/val_s*.json

The model's output, shrunk back to the probe's size, does not equal the probe (the network never sees the size).
Back-projection adds the upscaled difference until it does: ``sr += up(lr_small - down(sr))``, a few times (the
classical iterative back-projection, Irani & Peleg 1991; ``ipsr_model.degradation.back_project``). Scored with
`ipsr evaluate`'s scorer on one split (or ORL s1–s40: ``--data`` an ORL folder, ``--split all``) for bicubic, the
model alone and the model + back-projection (`Method.back_projection`, as `ipsr evaluate` runs it).

**Rule, written before any result:** back-projection becomes the default inference iff, on val with the three
pixel-only seeds, its mean SFace rank-1 over 7x6, 11x8 and 16x12 is higher than the plain model's and it is never
significantly worse than bicubic (exact McNemar p < 0.05) at any size in any seed on val. Test and ORL are reported
whatever they show.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean

# bench/ is the script's folder, so first on sys.path
from ablation import RECOGNIZERS, RULE_SIZES, SIZES, Scorer, View, compare


def score(args: argparse.Namespace) -> None:
    from ipsr_platform.models import load_generator
    from ipsr_platform.scoring import BICUBIC, Method

    recognizers = tuple(args.recognizers.split(","))
    identities = "s*" if args.split == "all" else None
    scorer = Scorer(args.data, View(args.split, recognizers, tuple(args.sizes.split(","))), identities)
    model = load_generator(args.model).module.eval()
    methods = [Method(BICUBIC), Method("model", model, "model"), Method("bp", model, "bp", back_projection=args.steps)]
    out = {"file": args.model, "split": args.split, **scorer(methods)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


def rate(bits: str) -> float:
    return bits.count("1") / len(bits)


def report(files: list[Path]) -> None:
    runs = [json.loads(f.read_text()) for f in files]
    for rec in [r for r in RECOGNIZERS if r in runs[0]["model"]]:
        print(f"\n{rec} ({runs[0]['split']}; p: exact McNemar against bicubic, * better, † worse)")
        for size in [s for s in SIZES + ("32x32", "112x96") if s in runs[0]["model"][rec]]:
            cells = []
            for run in runs:
                bic, plain, bp = (run[m][rec][size] for m in ("bicubic", "model", "bp"))
                m, a, b = compare(plain, bic), compare(bp, bic), compare(bp, plain)
                p = {k: f"{t['p']:.2g}{t['sign']}" for k, t in (("m", m), ("a", a), ("b", b))}
                cells.append(f"bicubic {rate(bic):.3f} model {rate(plain):.3f} (p {p['m']}) "
                             f"bp {rate(bp):.3f} (p {p['a']}; vs model {p['b']})")  # fmt: skip
            print(f"  {size} ({len(bic)} probes): " + " | ".join(cells))
    if "sface" in runs[0]["model"]:
        for label in ("model", "bp"):
            mean = fmean(rate(run[label]["sface"][s]) for run in runs for s in RULE_SIZES if s in run[label]["sface"])
            print(f"rule score, {label}: mean SFace rank-1 over {'/'.join(RULE_SIZES)}, {len(runs)} seeds: {mean:.4f}")
    print("PSNR dB: " + "; ".join(
        f"{s} " + " ".join(f"{m} {fmean(r[m]['psnr'][s] for r in runs):.2f}" for m in ("bicubic", "model", "bp"))
        for s in runs[0]["model"]["psnr"]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a preprocess output, or an ORL folder with --split all")
    parser.add_argument("--split", default="val", help="val, test, or all (ORL s1–s40)")
    parser.add_argument("--model", help="a generator file (bench/train_cpu.py output)")
    parser.add_argument("--recognizers", default="sface")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--steps", type=int, default=3, help="back-projection steps")
    parser.add_argument("--out", type=Path, help="where the per-probe hits go (JSON)")
    parser.add_argument("--report", nargs="+", type=Path, help="tables from these JSON files; nothing scored")
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    if not (args.data and args.model and args.out):
        parser.error("--data, --model and --out are required unless --report")
    score(args)


if __name__ == "__main__":
    main()
