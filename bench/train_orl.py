"""Train a U-Net on ORL identities s1–s30 for a fixed CPU budget, for `ipsr evaluate` on the unseen s31–s40.

    python bench/train_orl.py --data ../shared/data/att_faces --cpu-minutes 10 --out /tmp/orl_unet.pt
    ipsr evaluate --protocol folder --data ../shared/data/att_faces --identities 's3[1-9],s40' --model /tmp/orl_unet.pt

In-process (no Ray: one small model on one CPU machine) with the training step of `ipsr train`
(`ipsr_model.training.training_step`): per-sample multi-scale degradation, L = L_embedding + beta * L_pixel through
the frozen FaceNet. The budget is *process CPU time* (all threads), so runs sharing a busy machine get the same
compute. Faces are flipped left/right at random (every arm alike). Writes a plain generator state dict
(weights_only loadable, residual flag included) that `ipsr evaluate --model PATH` takes, and a JSON log beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ipsr_model.degradation import MultiScaleDegradation
from ipsr_model.losses import EMBEDDING_LOSSES, IdentityPreservingLoss
from ipsr_model.training import grad_shares, make_optimizer, make_scheduler, training_step
from ipsr_model.unet import UNetGenerator
from ipsr_platform.smoke import list_identities, load_faces


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--first", type=int, default=1, help="first ORL identity number (s<first>)")
    parser.add_argument("--last", type=int, default=30, help="last ORL identity number (s<last>)")
    parser.add_argument("--cpu-minutes", type=float, default=10.0, help="process CPU-time budget")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--embedding-loss", choices=EMBEDDING_LOSSES, default="distance")
    parser.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--jitter", type=float, default=0.0, help="random view of SR/HR before FaceNet")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--identity-weights", default="casia-webface-offline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    identities = list_identities(args.data)
    names = [f"s{i}" for i in range(args.first, args.last + 1)]
    faces = load_faces([path for name in names for path in identities[name]])
    print(f"{len(faces)} training faces from {names[0]}..{names[-1]}", flush=True)

    identity_net = None
    if args.embedding_loss != "none":
        from ipsr_model.identity import IdentityNet

        identity_net = IdentityNet(args.identity_weights)
    loss_fn = IdentityPreservingLoss(identity_net, args.beta, args.embedding_loss, jitter=args.jitter)
    generator = UNetGenerator(args.base_channels, residual=args.residual)
    optimizer = make_optimizer(generator, lr=args.lr)
    scheduler = make_scheduler(optimizer, total_steps=args.max_steps, warmup_steps=args.warmup_steps)
    degradation, rng = MultiScaleDegradation(), torch.Generator().manual_seed(args.seed)
    budget = args.cpu_minutes * 60  # bounded: stops at the CPU budget or max steps
    cpu0, wall0, step, log = time.process_time(), time.monotonic(), 0, []
    while step < args.max_steps and time.process_time() - cpu0 < budget:
        batch = faces[torch.randint(len(faces), (args.batch_size,), generator=rng)]
        flip = torch.rand(len(batch), generator=rng) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        stats = training_step(generator, loss_fn, optimizer, batch, degradation, rng, scheduler=scheduler)
        step += 1
        if step % 25 == 0:
            share = float(grad_shares(stats.grad_embedding, stats.grad_pixel)[0])
            row = {"step": step, "cpu_s": time.process_time() - cpu0, "grad_share_embedding": share}
            log.append(row | {k: v for k, v in stats.as_floats().items() if not k.startswith("grad")})
            print(", ".join(f"{k} {v:.4g}" for k, v in log[-1].items()), flush=True)
    generator.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(generator.state_dict(), args.out)
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps": step, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0, "log": log,
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"saved {args.out} after {step} steps, {summary['cpu_s']:.0f} CPU-s, {summary['wall_s']:.0f} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
