"""Back-projection after the model (#25): does making the output agree with its LR input help recognition?

    python bench/back_projection.py --data /work/abl/celeba_aligned --split val --model /work/abl/runs/pixel_s0.pt \
        --out /tmp/bp/val_s0.json
    python bench/back_projection.py --report /tmp/bp/val_s*.json

The model's output, shrunk back to the probe's size, does not equal the probe (the network never sees the size).
Back-projection adds the upscaled difference until it does: ``sr += up(lr_small - down(sr))``, a few times (the
classical iterative back-projection, Irani & Peleg 1991). It needs the LR image at its own size, which evaluation
and serving both have; here it is recovered exactly from the 128×128 bicubic input (the upscale is a linear map of
full column rank). Scored with `ipsr evaluate`'s scorer on one split (or ORL s1–s40: ``--data`` an ORL folder,
``--split all``), one size at a time, for bicubic, the model and the model + back-projection.

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

import torch
from ablation import RULE_SIZES, SIZES, Scorer, View, compare  # bench/ is the script's folder, so first on sys.path

from ipsr_model.degradation import back_project, parse_size, resize

HR = (128, 128)


def upscale_pinv(n: int) -> torch.Tensor:
    """The pseudo-inverse of the 1-D bicubic upscale from n to 128 samples: [n, 128]."""
    # Row j: the upscale of the j-th unit vector. Images 4 wide: torch's antialiased bicubic mishandles 1-wide ones.
    basis = resize(torch.eye(n).view(n, 1, n, 1).expand(n, 1, n, 4), (HR[0], 4))[:, 0, :, 0]
    return torch.linalg.pinv(basis.T)


class BackProjected(torch.nn.Module):
    """``model``, then ``iterations`` back-projection steps toward the LR image the input was upscaled from."""

    def __init__(self, model: torch.nn.Module, size: tuple[int, int], iterations: int = 3):
        super().__init__()
        self.model, self.size, self.iterations = model, size, iterations
        self.rows, self.cols = upscale_pinv(size[0]), upscale_pinv(size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = self.rows @ x @ self.cols.T  # the LR image at its own size
        return back_project(self.model(x), small, self.iterations)


def score(args: argparse.Namespace) -> None:
    from ipsr_platform.models import load_generator
    from ipsr_platform.scoring import BICUBIC, Method

    recognizers = tuple(args.recognizers.split(","))
    sizes = tuple(args.sizes.split(","))
    identities = "s*" if args.split == "all" else None
    scorer = Scorer(args.data, View(args.split, recognizers, sizes), identities)
    model = load_generator(args.model).module.eval()
    columns, out = scorer.protocol.columns, {"file": args.model, "split": args.split}
    for column in columns:  # one size at a time: the back-projection needs it
        scorer.protocol.columns = [column]
        bp = BackProjected(model, parse_size(column.name), args.iterations)
        results = scorer([Method(BICUBIC), Method("model", model, "model"), Method("bp", bp, "bp")])
        for label, row in results.items():
            for key, value in row.items():
                if isinstance(value, dict):
                    out.setdefault(label, {}).setdefault(key, {}).update(value)
        print(column.name, {k: (v["psnr"][column.name] if "psnr" in v else None) for k, v in results.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


def rate(bits: str) -> float:
    return bits.count("1") / len(bits)


def report(files: list[Path]) -> None:
    runs = [json.loads(f.read_text()) for f in files]
    for rec in [r for r in runs[0]["model"] if r not in ("psnr", "ssim")]:
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
    parser.add_argument("--iterations", type=int, default=3)
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
