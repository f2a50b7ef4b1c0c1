"""Why a CelebA-trained model loses to bicubic with FaceNet on ORL at mild degradations (#25): a diagnosis.

    python bench/orl_diagnosis.py --orl ../shared/data/att_faces --model /work/abl/runs/pixel_s0.pt

Prints (1) how far the model's output on ORL's grey faces is from grey (a colour tint was the first guess),
(2) rank-1 on ORL s1–s40 (every non-gallery face a probe) of bicubic, the model, and the model with its output
made grey, at 21x15, 32x32 and 112x96, with the exact McNemar test of each against bicubic, (3) with
``--celeba <preprocess output>``: the high-frequency energy (mean |Laplacian| of luminance) of HR faces, bicubic and
the model on ORL and on CelebA test faces (a second guess: outputs sharper than ORL's blurrier gallery).
``--facenet ms-celeb-keras`` scores with the paper's own FaceNet instead of the CASIA one (is the miss this network's?).
``--grey-val <preprocess output>`` instead scores the model against bicubic on that dataset's *val* faces made grey
(gallery and probes): does a set the ablation may select on show the ORL miss? (ORL is then not read.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from ablation import Scorer, View, compare  # bench/ is the script's folder, so first on sys.path

SIZES = ("21x15", "32x32", "112x96")
LAPLACIAN = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)


def high_frequency(x: torch.Tensor) -> float:
    return float(torch.nn.functional.conv2d(x.mean(1, keepdim=True), LAPLACIAN).abs().mean())


def sharpness(name: str, hr: torch.Tensor, model: torch.nn.Module) -> None:
    from ipsr_model.degradation import degrade, parse_size

    cells = [f"HR {high_frequency(hr):.4f}"]
    for size in SIZES:
        lr = degrade(hr, parse_size(size))
        with torch.no_grad():
            cells.append(f"{size} bicubic {high_frequency(lr):.4f} model {high_frequency(model(lr)):.4f}")
    print(f"high-frequency energy, {name}, {len(hr)} faces: " + "; ".join(cells))


def grey(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's channels replaced by their mean."""
    return x.mean(1, keepdim=True).expand_as(x).contiguous()


class GreyOutput(torch.nn.Module):
    """The model with its output's channels replaced by their mean."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grey(self.model(x))


def grey_val(data: Path, model: torch.nn.Module, recognizers: tuple[str, ...], facenet: str | None) -> None:
    """Rank-1 of bicubic and the model on ``data``'s val identities in colour, then with every face (gallery and
    probes) grey."""
    from ipsr_platform.scoring import BICUBIC, Method

    scorer = Scorer(data, View("val", recognizers, SIZES[:2]), None, facenet)
    protocol = scorer.protocol
    for mode in ("colour", "grey"):
        if mode == "grey":
            protocol.gallery = grey(protocol.gallery)
            for column in protocol.columns:
                column.images = grey(column.images)
        results = scorer([Method(BICUBIC), Method("model", model, "model")])
        for rec in recognizers:
            for size in SIZES[:2]:
                bicubic, hits = results[BICUBIC][rec][size], results["model"][rec][size]
                test = compare(hits, bicubic)
                print(f"{mode} val {rec} {size} ({len(hits)} probes): bicubic {bicubic.count('1') / len(bicubic):.3f},"
                      f" model {hits.count('1') / len(hits):.3f} (p {test['p']:.2g}{test['sign']})")  # fmt: skip


def main() -> None:
    from ipsr_model.degradation import degrade
    from ipsr_platform.models import load_generator
    from ipsr_platform.scoring import BICUBIC, Method

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orl", type=Path)
    parser.add_argument("--grey-val", type=Path, help="a preprocess output: score its val split made grey instead")
    parser.add_argument("--model", required=True, help="a generator file (bench/train_cpu.py output)")
    parser.add_argument("--recognizers", default="facenet,sface")
    parser.add_argument("--facenet", help="FaceNet weights source (default CASIA; ms-celeb-keras: the paper's)")
    parser.add_argument("--celeba", type=Path, help="a CelebA preprocess output: compare high-frequency energy")
    args = parser.parse_args()

    if not (args.orl or args.grey_val):
        parser.error("--orl or --grey-val is required")
    recognizers = tuple(args.recognizers.split(","))
    model = load_generator(args.model).module.eval()
    if args.grey_val:
        return grey_val(args.grey_val, model, recognizers, args.facenet)
    scorer = Scorer(args.orl, View("all", recognizers, SIZES), "s*", args.facenet)
    faces = scorer.protocol.columns[0].images[:64]
    with torch.no_grad():
        out = model(degrade(faces, (21, 15)))
    chroma = (out - out.mean(1, keepdim=True)).abs()
    print(f"output chroma at 21x15, 64 faces ([-1, 1] scale): mean {chroma.mean():.4f}, max {chroma.max():.4f}")
    if args.celeba:
        from ipsr_platform.config import EvaluateConfig
        from jobs.evaluate import build_protocol

        sharpness("ORL", scorer.protocol.columns[0].images[:200], model)
        celeba = build_protocol(EvaluateConfig(data=str(args.celeba), protocol="folder", split="test", sizes="21x15"))
        sharpness("CelebA test", celeba.columns[0].images[:200], model)
    results = scorer([Method(BICUBIC), Method("model", model, "model"), Method("grey", GreyOutput(model), "grey")])
    for rec in recognizers:
        for size in SIZES:
            bicubic = results[BICUBIC][rec][size]
            cells = [f"bicubic {bicubic.count('1') / len(bicubic):.3f}"]
            for label in ("model", "grey"):
                hits = results[label][rec][size]
                test = compare(hits, bicubic)
                cells.append(f"{label} {hits.count('1') / len(hits):.3f} (p {test['p']:.2g}{test['sign']})")
            print(f"{rec} {size}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
