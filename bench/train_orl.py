"""Train a U-Net on ORL identities s1–s30 for a fixed wall-clock budget (CPU), for `ipsr evaluate` on s31–s40.

    python bench/train_orl.py --data ../shared/data/att_faces --minutes 12 --out /tmp/orl_unet.pt
    ipsr evaluate --data ../shared/data/att_faces --identities 's3[1-9],s40' --model /tmp/orl_unet.pt

In-process (no Ray: one small model on one CPU machine) with the same training step as `ipsr train`
(ipsr_model.training): per-sample multi-scale degradation, L = L_embedding + beta * L_pixel through the frozen
FaceNet. Writes a plain generator state dict (weights_only loadable) that `ipsr evaluate --model PATH` takes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ipsr_model.degradation import MultiScaleDegradation
from ipsr_model.identity import IdentityNet
from ipsr_model.losses import IdentityPreservingLoss, LossTerms
from ipsr_model.training import make_optimizer, training_step
from ipsr_model.unet import UNetGenerator
from ipsr_platform.smoke import list_identities, load_faces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--first", type=int, default=1, help="first ORL identity number (s<first>)")
    parser.add_argument("--last", type=int, default=30, help="last ORL identity number (s<last>)")
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixel-only", action="store_true", help="ablation: L = beta * L_pixel (no L_embedding)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    identities = list_identities(args.data)
    names = [f"s{i}" for i in range(args.first, args.last + 1)]
    faces = load_faces([path for name in names for path in identities[name]])
    print(f"{len(faces)} training faces from {names[0]}..{names[-1]}")

    generator = UNetGenerator(args.base_channels)
    if args.pixel_only:  # the paper's ablation: no identity network in the loss at all

        def loss_fn(sr: torch.Tensor, hr: torch.Tensor) -> LossTerms:
            pixel = F.mse_loss(sr, hr)
            return LossTerms(args.beta * pixel, torch.zeros(()), pixel)

    else:
        loss_fn = IdentityPreservingLoss(IdentityNet("casia-webface-offline"), beta=args.beta)
    optimizer = make_optimizer(generator, lr=args.lr)
    degradation, rng = MultiScaleDegradation(), torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60  # bounded: stops at the budget or max steps
    step, started = 0, time.monotonic()
    while step < args.max_steps and time.monotonic() < deadline:
        batch = faces[torch.randint(len(faces), (args.batch_size,), generator=rng)]
        terms = training_step(generator, loss_fn, optimizer, batch, degradation, rng).as_floats()
        step += 1
        if step % 25 == 0:
            print(f"step {step} ({time.monotonic() - started:.0f} s): " + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()), flush=True)
    generator.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(generator.state_dict(), args.out)
    print(f"saved {args.out} after {step} steps in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
