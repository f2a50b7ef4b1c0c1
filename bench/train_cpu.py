"""Train a U-Net in one process on one CPU thread: the unit of `bench/ablation.py`'s loss ablation.

    python bench/train_cpu.py --data ALIGNED --max-steps 560 --embedding-loss mse --out /tmp/mse_s0.pt
    ipsr evaluate --protocol folder --data ALIGNED --split test --model /tmp/mse_s0.pt

``--data`` is an ``ipsr preprocess`` output (its ``train`` split is read; val and test identities never are) or
identity folders (``--identities`` globs pick the training identities, e.g. ORL s1–s30). The step is `ipsr train`'s
(`ipsr_model.training.training_step`: per-sample multi-scale degradation, L = L_embedding + beta * L_pixel through
frozen identity nets); no Ray: one small model on one core is what the ablation compares. Faces are flipped
left/right at random. The run ends at ``--max-steps`` or when ``--cpu-minutes`` of process CPU time are spent.

Levers beyond the loss: ``--pixel-steps N`` trains the first N steps pixel-only (pretraining, then identity
fine-tuning); ``--identity-every K`` adds the identity term on every K-th step only; ``--hr-embeddings`` reads the
dataset's precomputed FaceNet embeddings of HR (made once by preprocess; the mirrored faces' once at start-up,
before the clock starts); ``--identity-weights a,b`` puts several identity nets in the loss (the mean of their
terms). ``--save-at`` keeps the generator at those steps too. Writes plain generator state dicts (weights_only
loadable; `ipsr evaluate --model PATH` takes them) and, last, a JSON log.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ipsr_model.degradation import MultiScaleDegradation, random_greyscale
from ipsr_model.images import from_uint8
from ipsr_model.losses import EMBEDDING_LOSSES, IdentityPreservingLoss
from ipsr_model.training import StepStats, grad_shares, make_optimizer, training_step
from ipsr_model.unet import UNetGenerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ipsr preprocess output, or identity folders")
    parser.add_argument("--identities", default=None, help="identity folders only: comma-separated globs")
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--cpu-minutes", type=float, default=float("inf"), help="process CPU-time budget")
    parser.add_argument("--save-at", default="", help="also save the generator at these steps (comma-separated)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--embedding-loss", choices=EMBEDDING_LOSSES, default="mse")
    parser.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--jitter", type=float, default=0.0, help="random view of SR/HR before the identity net")
    parser.add_argument("--grey-p", type=float, default=0.0, help="share of training faces made greyscale")
    parser.add_argument("--pixel-steps", type=int, default=0, help="the first N steps pixel-only (pretraining)")
    parser.add_argument("--identity-every", type=int, default=1, help="identity term on every K-th step only")
    parser.add_argument("--hr-embeddings", action="store_true", help="use the dataset's precomputed HR embeddings")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--identity-weights", default="casia-webface-offline", help="one source, or several: a,b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.identity_every < 1 or args.pixel_steps < 0:
        parser.error("--identity-every must be >= 1 and --pixel-steps >= 0")
    if not 0 <= args.grey_p <= 1 or (args.grey_p and args.hr_embeddings):
        parser.error("--grey-p must be in [0, 1], and 0 with --hr-embeddings (those are of the colour faces)")
    if args.hr_embeddings and (args.jitter or "," in args.identity_weights):
        parser.error("--hr-embeddings needs --jitter 0 and a single identity net (the dataset's)")
    args.save_steps = sorted({int(s) for s in args.save_at.split(",") if s.strip()})
    return args


def read_train_faces(
    data: Path, identities: str | None, embeddings: bool
) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """uint8 NHWC faces of the training identities, their precomputed HR embeddings and those weights' sha256."""
    if (data / "_SUCCESS").exists():
        import pyarrow.parquet as pq

        from ipsr_platform.faces import decode_faces

        columns = ["image", "hr_embedding"] if embeddings else ["image"]
        table = pq.read_table(data / "data", columns=columns, filters=[("split", "=", "train")])
        faces = torch.from_numpy(decode_faces(table.column("image").to_pylist()))
        if not embeddings:
            return faces, None, None
        vectors = torch.from_numpy(np.stack(table.column("hr_embedding").to_numpy(zero_copy_only=False)))
        manifest = json.loads((data / "manifest.json").read_text())
        return faces, vectors.float(), (manifest.get("hr_embeddings") or {}).get("identity_net_sha256")
    if embeddings:
        raise SystemExit("error: --hr-embeddings needs an ipsr preprocess output made with --hr-embeddings")
    from ipsr_model.images import square_face
    from ipsr_platform.faces import IMAGE_SUFFIXES, natural_key, read_image

    patterns = [g.strip() for g in (identities or "*").split(",")]
    folders = [
        f for f in sorted(data.iterdir()) if f.is_dir() and any(fnmatch.fnmatchcase(f.name, p) for p in patterns)
    ]
    paths = [p for f in folders for p in sorted(f.iterdir(), key=natural_key) if p.suffix.lower() in IMAGE_SUFFIXES]
    return torch.from_numpy(np.stack([np.asarray(square_face(read_image(p))) for p in paths])), None, None


@dataclass
class Trainer:
    """Everything one run needs; ``step(i)`` takes optimisation step i (0-based)."""

    args: argparse.Namespace
    faces: torch.Tensor
    hr_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # of each face, and of its mirror image
    identity_loss: IdentityPreservingLoss
    pixel_loss: IdentityPreservingLoss
    generator: UNetGenerator
    optimizer: torch.optim.Optimizer
    rng: torch.Generator
    degradation: MultiScaleDegradation = MultiScaleDegradation()

    @classmethod
    def build(cls, args: argparse.Namespace) -> Trainer:
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        faces, vectors, sha256 = read_train_faces(args.data, args.identities, args.hr_embeddings)
        pixel = IdentityPreservingLoss(None, args.beta, "none")
        identity = pixel
        if args.embedding_loss != "none":
            from ipsr_model.identity import IdentityNet

            nets = [IdentityNet(source.strip()) for source in args.identity_weights.split(",")]
            if args.hr_embeddings and nets[0].weights_sha256 != sha256:
                raise SystemExit(
                    f"error: the dataset's HR embeddings were made with weights {str(sha256)[:12]}…, "
                    f"not {args.identity_weights} ({nets[0].weights_sha256[:12]}…)"
                )
            identity = IdentityPreservingLoss(nets, args.beta, args.embedding_loss, jitter=args.jitter)
        if vectors is not None:  # a mirrored face has its own embedding
            vectors = (vectors, mirrored_embeddings(identity.identity_nets[0], faces, args))
        generator = UNetGenerator(args.base_channels, residual=args.residual)
        return cls(
            args,
            faces,
            vectors,
            identity,
            pixel,
            generator,
            make_optimizer(generator, lr=args.lr),
            torch.Generator().manual_seed(args.seed),
        )

    def with_identity(self, i: int) -> bool:
        return (
            self.identity_loss is not self.pixel_loss
            and i >= self.args.pixel_steps
            and ((i - self.args.pixel_steps) % self.args.identity_every == 0)
        )

    def step(self, i: int) -> StepStats:
        index = torch.randint(len(self.faces), (self.args.batch_size,), generator=self.rng)
        flip = torch.rand(len(index), generator=self.rng) < 0.5
        batch = from_uint8(self.faces[index])
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        if self.args.grey_p:
            batch = random_greyscale(batch, self.args.grey_p, self.rng)
        identity, hr_embedding = self.with_identity(i), None
        if identity and self.hr_embeddings is not None:
            hr_embedding = torch.where(flip[:, None], self.hr_embeddings[1][index], self.hr_embeddings[0][index])
        loss_fn = self.identity_loss if identity else self.pixel_loss
        return training_step(
            self.generator, loss_fn, self.optimizer, batch, self.degradation, self.rng, hr_embedding=hr_embedding
        )


def mirrored_embeddings(net: torch.nn.Module, faces: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The identity net's embedding of every face's mirror image, cached beside ``--out`` (one per set of faces)."""
    digest = hashlib.sha256(faces.numpy().tobytes()).hexdigest()[:16]
    cache = args.out.parent / f".mirrored-{digest}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # once per dataset, before any clock starts: use the machine
    with torch.no_grad():
        vectors = torch.cat([net(from_uint8(chunk).flip(-1)).float() for chunk in faces.split(64)])
    torch.set_num_threads(threads)
    save_atomic(vectors, cache)
    return vectors


def save_atomic(obj, path: Path) -> None:
    """A file that exists is whole: written beside, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def snapshot_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.stem}.step{step}.pt")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    trainer = Trainer.build(args)
    print(f"{len(trainer.faces)} training faces from {args.data}", flush=True)
    budget, saved = args.cpu_minutes * 60, {}
    cpu0, wall0, step, log, identity_steps = time.process_time(), time.monotonic(), 0, [], 0
    while step < args.max_steps and time.process_time() - cpu0 < budget:  # bounded by both
        identity_steps += trainer.with_identity(step)
        stats = trainer.step(step)
        step += 1
        if step in args.save_steps:
            saved[step] = str(snapshot_path(args.out, step))
            save_atomic(trainer.generator.state_dict(), Path(saved[step]))  # a state dict has no train/eval mode
        if step % 25 == 0:
            share = float(grad_shares(stats.grad_embedding, stats.grad_pixel)[0])
            row = {"step": step, "cpu_s": time.process_time() - cpu0, "grad_share_embedding": share}
            log.append(row | {k: v for k, v in stats.as_floats().items() if not k.startswith("grad")})
            print(", ".join(f"{k} {v:.4g}" for k, v in log[-1].items()), flush=True)
    save_atomic(trainer.generator.state_dict(), args.out)
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "steps": step,
        "identity_steps": identity_steps, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0,
        "saved": saved, "log": log,
    }  # fmt: skip
    save_atomic(summary, args.out.with_suffix(".json"))  # last: a run with its .json is complete
    print(
        f"saved {args.out} after {step} steps ({identity_steps} with the identity term), {summary['cpu_s']:.0f} "
        f"CPU-s, {summary['wall_s']:.0f} s",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    main()
