"""The `ipsr` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ipsr_model.errors import UserError

app = typer.Typer(
    name="ipsr",
    help="Identity-preserving super-resolution for low-resolution face recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
weights_app = typer.Typer(help="Identity-network (FaceNet) weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("fetch")
def weights_fetch(
    source: Annotated[str, typer.Option(help="casia-webface-offline | vggface2 | casia-webface | PATH")] = (
        "casia-webface-offline"
    ),
    force: Annotated[bool, typer.Option(help="Fetch again even when cached.")] = False,
) -> None:
    """Download or convert FaceNet weights into the cache ($IPSR_HOME/weights) and print path + sha256."""
    from ipsr_model.weights import fetch_identity_weights, load_identity_weights

    path = fetch_identity_weights(source, force=force)
    _, sha256 = load_identity_weights(source)
    typer.echo(f"{source}: {path}\nsha256: {sha256}")


@app.command()
def smoke(
    data: Annotated[Path, typer.Option(help="Identity folders of face images, e.g. ../shared/data/att_faces.")],
    identity_weights: Annotated[str, typer.Option(help="FaceNet weights source.")] = "casia-webface-offline",
    steps: Annotated[int, typer.Option(min=1, help="Training steps of the tiny U-Net.")] = 30,
    base_channels: Annotated[int, typer.Option(min=1, help="U-Net width (64 = paper).")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Smoke run of the model core: AR-style bicubic baseline, then a short CPU training run."""
    from ipsr_platform.smoke import run_smoke

    run_smoke(data, identity_weights=identity_weights, steps=steps, base_channels=base_channels, seed=seed)


@app.command()
def preprocess(
    input_: Annotated[Optional[str], typer.Option("--input", help="SRC/<identity>/<image>: path or s3://.")] = None,
    output: Annotated[Optional[str], typer.Option(help="Dataset destination: path or s3://bucket/prefix.")] = None,
    manifest: Annotated[Optional[str], typer.Option(help="List of inputs (.txt or .parquet) instead of listing SRC.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N inputs (sorted by identity, path).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda")] = None,
    num_actors: Annotated[Optional[int], typer.Option(help="MTCNN actors (default: one per CPU, 4 per GPU).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per MTCNN call (default 32).")] = None,
    margin: Annotated[Optional[int], typer.Option(help="Context around the face in output pixels (default 16).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Identity fractions, e.g. val=0.02,test=0.02.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Rebuild a committed output.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with any option (< IPSR_PREPROCESS_* env < flags).")] = None,
) -> None:
    """Detect and align faces with MTCNN on Ray Data: identity folders → 128×128 Parquet dataset + rejects."""
    from ipsr_platform.config import PreprocessConfig, build_config
    from jobs.preprocess import run

    cfg = build_config(
        PreprocessConfig, env_prefix="IPSR_PREPROCESS_", yaml_file=config, input=input_, output=output,
        manifest=manifest, limit=limit, device=device, num_actors=num_actors, batch_size=batch_size, margin=margin,
        split=split, overwrite=overwrite,
    )
    run(cfg)


@app.command()
def train(
    data: Annotated[Optional[str], typer.Option(help="Output of `ipsr preprocess` (path or s3://).")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="Names the run; rerun the same command to resume.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the train split (default 10).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimiser steps instead of --epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Faces per worker and step (default 64).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Ray Train workers / DDP ranks (default 1).")] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu", help="One GPU per worker, bf16 autocast.")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="Default leaves CPUs to Ray Data ingest.")] = None,
    base_channels: Annotated[Optional[int], typer.Option(help="U-Net width (default 64 = paper).")] = None,
    identity_weights: Annotated[Optional[str], typer.Option(help="FaceNet weights source or PATH.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="L = L_embedding + beta * L_pixel (default 5).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default 2e-4, beta1 0.5).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Checkpoints: path or s3:// (default $IPSR_HOME/runs).")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default ipsr-train).")] = None,
    register_as: Annotated[Optional[str], typer.Option(help="Registered model name (default ipsr-unet).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints (default 500).")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Best checkpoints kept (default 3).")] = None,
    max_failures: Annotated[Optional[int], typer.Option(help="Worker failures survived (default 3).")] = None,
    val_sizes: Annotated[Optional[str], typer.Option(help="Validation sizes (default 16x12,21x15,32x32).")] = None,
    val_identities: Annotated[Optional[int], typer.Option(help="Max val identities (default 256).")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps between logged losses (default 10).")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile", help="torch.compile the generator.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with any option (< IPSR_TRAIN_* env < flags).")] = None,
) -> None:
    """Train the U-Net with Ray Train (DDP) on Ray Data, track in MLflow, register @candidate."""
    from ipsr_platform.config import TrainConfig, build_config
    from jobs.train import train as run_train

    cfg = build_config(
        TrainConfig, env_prefix="IPSR_TRAIN_", yaml_file=config, data=data, run_name=run_name, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, num_workers=num_workers, gpu=gpu, cpus_per_worker=cpus_per_worker,
        base_channels=base_channels, identity_weights=identity_weights, beta=beta, lr=lr, storage=storage,
        experiment=experiment, register_as=register_as, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, max_failures=max_failures, val_sizes=val_sizes, compile=compile_, seed=seed,
        val_identities=val_identities, log_every=log_every,
    )
    summary = run_train(cfg)
    if summary.get("already_finished"):
        typer.echo(f"run {summary['run_name']} already finished; nothing to do")
    val = ", ".join(f"{size} {value:.3f}" for size, value in summary["val_rank1"].items())
    typer.echo(
        f"run {summary['run_name']}: {summary['steps']} steps (resumed from step {summary['resumed_from_step']}); "
        f"val rank-1 {val}\nregistered {summary['model']} version {summary['model_version']} as "
        f"{summary['model_uri']} (MLflow run {summary['mlflow_run_id']})"
    )


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
