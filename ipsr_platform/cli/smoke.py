"""`ipsr smoke`: the model core end to end on one machine, no Ray, no MLflow.

1. AR-style identification baseline (gallery = first image, probe = second image of every identity; probes
   degraded to each paper size) for HR and bicubic, with the frozen FaceNet.
2. A short training run of a small U-Net on the remaining images; the same table for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Column, Table

from ipsr_model.degradation import MultiScaleDegradation, parse_size
from ipsr_model.errors import UserError
from ipsr_model.identity import IdentityNet
from ipsr_model.images import square_face, to_tensor
from ipsr_model.losses import IdentityPreservingLoss
from ipsr_model.training import make_optimizer, training_step
from ipsr_model.unet import UNetGenerator
from ipsr_platform import config
from ipsr_platform.faces import IMAGE_SUFFIXES, identity_files, read_image
from ipsr_platform.scoring import rank1_by_size
from ipsr_platform.storage import Storage

AR_SIZES = tuple(parse_size(s) for s in config.AR_SIZES)  # the one AR list, also `ipsr evaluate`'s default
BATCH_SIZE = 8


def list_identities(root: Path) -> dict[str, list[Path]]:
    """identity folder name -> its image files in natural order (identities with >= 2 images only)."""
    if not root.is_dir():
        raise UserError(f"--data {root}: no such directory")
    folders = {
        name: [Path(e.path) for e in entries if Path(e.base_name).suffix.lower() in IMAGE_SUFFIXES]
        for name, entries in identity_files(str(root), Storage())[0].items()
    }
    usable = {name: files for name, files in folders.items() if len(files) >= 2}
    if len(usable) < 2:
        raise UserError(
            f"--data {root}: need identity folders (DIR/<identity>/<image>) with >= 2 images each for at "
            f"least 2 identities; found {len(usable)}"
        )
    return usable


def load_faces(paths: list[Path]) -> torch.Tensor:
    return to_tensor([square_face(read_image(path)) for path in paths])


def run_smoke(data: Path, *, identity_weights: str, steps: int, base_channels: int, seed: int) -> dict:
    console = Console()
    torch.manual_seed(seed)
    identities = list_identities(data)
    names = list(identities)
    console.print(f"[bold]data[/]: {data} — {len(names)} identities, {sum(map(len, identities.values()))} images")

    identity_net = IdentityNet(identity_weights)
    console.print(
        f"[bold]identity net[/]: FaceNet InceptionResnetV1 ({identity_weights}, "
        f"sha256 {identity_net.weights_sha256[:12]}…)"
    )

    labels = torch.arange(len(names))
    gallery = load_faces([identities[name][0] for name in names])
    probes = load_faces([identities[name][1] for name in names])
    train_paths = [path for name in names for path in identities[name][2:]] or [identities[n][0] for n in names]
    train_faces = load_faces(train_paths)

    started = time.perf_counter()
    bicubic = rank1_by_size(identity_net, gallery, probes, labels, AR_SIZES)

    default = config.TrainConfig.model_fields  # the ipsr train defaults: one home
    generator = UNetGenerator(base_channels, residual=default["residual"].default)
    loss_fn = IdentityPreservingLoss(identity_net, embedding_loss=default["embedding_loss"].default)
    optimizer = make_optimizer(generator)
    degradation = MultiScaleDegradation()
    rng = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = train_faces[torch.randint(len(train_faces), (BATCH_SIZE,), generator=rng)]
        losses.append(training_step(generator, loss_fn, optimizer, batch, degradation, rng).as_floats())
    generator.eval()
    trained = rank1_by_size(identity_net, gallery, probes, labels, AR_SIZES, restore=generator)
    elapsed = time.perf_counter() - started

    table = Table(
        "method",
        *(Column(column, justify="right") for column in bicubic),
        title=f"AR-style rank-1 (gallery: first image, probe: second image; {len(names)} identities)",
    )
    table.add_row("bicubic", *(f"{value:.3f}" for value in bicubic.values()))
    table.add_row(f"U-Net w{base_channels}, {steps} steps", *(f"{value:.3f}" for value in trained.values()))
    console.print(table)
    first, last = losses[0], losses[-1]
    console.print(
        f"training: {steps} steps × batch {BATCH_SIZE} on {len(train_faces)} faces — loss "
        f"{first['total']:.4f} → {last['total']:.4f} (embedding {first['embedding']:.5f} → "
        f"{last['embedding']:.5f}, pixel {first['pixel']:.4f} → {last['pixel']:.4f}); {elapsed:.1f} s"
    )
    return {"bicubic": bicubic, "trained": trained, "losses": losses}
