"""The `ipsr` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional, cast

import click
import typer
import typer.main
import yaml

from ipsr_model.errors import UserError, first_line
from ipsr_model.paths import galleries_dir, ipsr_home
from ipsr_platform import commands, tracking
from ipsr_platform.commands import VerboseOption, job_command, run_main

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
    source: Annotated[
        str, typer.Option(help="casia-webface-offline | ms-celeb-keras | vggface2 | casia-webface | PATH")
    ] = ("casia-webface-offline"),
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
    from ipsr_platform.cli.smoke import run_smoke

    run_smoke(data, identity_weights=identity_weights, steps=steps, base_channels=base_channels, seed=seed)


app.command("preprocess")(
    job_command(
        "preprocess",
        "jobs.preprocess:run",
        doc="Detect and align faces with MTCNN on Ray Data: identity folders → 128×128 Parquet dataset + rejects.",
    )
)
app.command("train")(
    job_command(
        "train",
        "jobs.train:run_and_report",
        doc="Train the U-Net with Ray Train (DDP) on Ray Data, track in MLflow, register @candidate.",
    )
)
app.command("evaluate")(
    job_command(
        "evaluate",
        "jobs.evaluate:run_and_report",
        doc="Identification (rank-1, CMC) of HR / bicubic / SR probes with FaceNet and SFace; optional promotion.",
    )
)
app.command("enrol")(
    job_command(
        "enrol",
        "jobs.enrol:run",
        doc="Bulk enrolment on Ray Data: identity folders → FaceNet embeddings → new segments of a gallery.",
    )
)
app.command("identify")(
    job_command(
        "identify",
        "jobs.identify:run",
        doc="Bulk search on Ray Data: probe images → (SR →) FaceNet → top-k identities of a gallery, Parquet + CSV.",
    )
)
app.command("serve")(
    job_command(
        "serve",
        "serving.app:serve_forever",
        quiet=False,
        doc="Serve gallery enrolment + batch identification (Ray Serve, FastAPI); blocks until Ctrl-C.",
    )
)

gallery_app = typer.Typer(
    help="Enrolled galleries of `ipsr serve` (the store, without a running service).", no_args_is_help=True
)
app.add_typer(gallery_app, name="gallery")


@gallery_app.command("compact")
def gallery_compact(
    name: Annotated[str, typer.Argument(help="Gallery name.")],
    galleries: Annotated[
        Optional[str], typer.Option(help="Gallery store: path or s3:// (default $IPSR_HOME/galleries).")
    ] = None,
) -> None:
    """Merge a gallery's segments and deletions into one segment; enrolments landing meanwhile are kept."""
    from ipsr_platform.gallery import GalleryStore
    from ipsr_platform.storage import Storage

    store = GalleryStore(galleries or str(galleries_dir()), Storage.from_env())
    merged, rows = store.compact(name)
    typer.echo(f"gallery {name}: {merged} files merged into one segment of {rows} faces")


jobs_app = typer.Typer(help="Jobs on a Ray cluster (Ray Jobs API): list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
AddressOption = Annotated[str, typer.Option(help="Ray dashboard URL of the cluster, e.g. http://HEAD:8265.")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="preprocess | train | evaluate, followed by that job's flags.")],
    address: Annotated[Optional[str], typer.Option(help="Ray dashboard URL; without it the job runs here.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with the job's options (shipped with the job).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print entrypoint + runtime_env, check access.")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends.")] = False,
    forward_env: Annotated[
        Optional[list[str]],
        typer.Option(
            "--forward-env",
            help="Send this environment variable with the job (repeatable; it becomes readable in the "
            "job's record: the cluster should have its own credentials).",
        ),
    ] = None,
) -> None:
    """Run a job on a Ray cluster through the Jobs API (token auth from RAY_AUTH_TOKEN / its token file)."""
    from ipsr_platform.cli import submit as jobs_api

    commands = cast(
        click.Group, typer.main.get_command(app)
    ).commands  # the job's own flags are checked here, before submitting
    submission = jobs_api.build_submission(
        job, ctx.args, config, forward_env or [], commands=commands, warn=lambda line: typer.echo(line, err=True)
    )
    if dry_run:
        shown = {**submission["runtime_env"], "env_vars": jobs_api.redact(submission["runtime_env"]["env_vars"])}
        typer.echo(f"entrypoint: {submission['entrypoint']}\nruntime_env: {json.dumps(shown, indent=2)}")
        if address:
            jobs_api.check_access(jobs_api.client(address), address)
            typer.echo(f"cluster {address}: reachable and authorised")
        return
    if address is None:  # the embedded default: this process, local Ray
        if config is not None:
            os.environ[jobs_api.CONFIG_ENV] = config.read_text()
        app(args=[job, *ctx.args], standalone_mode=False)
        return
    job_id = jobs_api.submit(address, submission)
    typer.echo(f"submitted {job_id} to {address}")
    if follow:
        status = jobs_api.follow(address, job_id, typer.echo)
        typer.echo(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(address: AddressOption) -> None:
    from ipsr_platform.cli.submit import client

    for info in client(address).list_jobs():
        typer.echo(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption) -> None:
    typer.echo(str(_job_call(address, job_id, lambda job_client: job_client.get_job_status(job_id)).value))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: AddressOption) -> None:
    typer.echo(_job_call(address, job_id, lambda job_client: job_client.get_job_logs(job_id)))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption) -> None:
    stopped = _job_call(address, job_id, lambda job_client: job_client.stop_job(job_id))
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


def _job_call(address: str, job_id: str, call):
    from ipsr_platform.cli.submit import API_ERRORS, client

    try:
        return call(client(address))
    except API_ERRORS as err:  # the Jobs API answers an unknown id with a RuntimeError (HTTP 404)
        raise UserError(f"job {job_id}: {first_line(err)}") from None


config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Annotated[Optional[Path], typer.Option(help="YAML: one job's options, or sections platform/<job>.")] = None,
    job: Annotated[Optional[list[str]], typer.Argument(help="Only these sections (default: all).")] = None,
) -> None:
    """Print what each job would run with: YAML file < IPSR_* environment (flags are per run, not shown)."""
    from ipsr_platform.config import PLATFORM_ENV, SECTIONS, apply_platform, effective_config, job_configs, read_yaml

    wanted = job or list(SECTIONS)
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {unknown}; expected {', '.join(SECTIONS)}")
    if config is not None:  # the platform section first: the job sections' defaults may read the environment
        apply_platform(read_yaml(config).get("platform") or {}, str(config))
    out: list[str] = []
    if "platform" in wanted:
        platform = {field: os.environ.get(env) for field, env in PLATFORM_ENV.items()}
        platform["ray_address"] = platform["ray_address"] or "local (embedded Ray)"
        platform["mlflow_tracking_uri"] = tracking.tracking_uri()
        platform["home"] = str(ipsr_home())
        out.append(yaml.safe_dump({"platform": platform}, sort_keys=False))
    for name in wanted:
        if name == "platform":
            continue
        values, problem = effective_config(*job_configs()[name], config)
        text = yaml.safe_dump({name: values}, sort_keys=False)
        out.append(text + (f"# {name}: not runnable as is — {problem}\n" if problem else ""))
    typer.echo("\n".join(out).rstrip())


@app.command()
def quickstart(
    data: Annotated[
        Optional[Path], typer.Option(help="Identity folders DIR/<identity>/<image>; default: download LFW.")
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Where everything goes (default $IPSR_HOME/quickstart).")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Only the first N images, sorted by identity (the demo's time budget); 0 = all.")
    ] = 1500,
    max_steps: Annotated[
        int, typer.Option(min=1, help="Training steps (~0.6 s each at the defaults on 2 CPUs, validation included).")
    ] = 200,
    base_channels: Annotated[int, typer.Option(min=1, help="U-Net width (64 = paper; small for CPU).")] = 16,
    batch_size: Annotated[int, typer.Option(min=2, help="Faces per training step.")] = 16,
    identity_weights: Annotated[str, typer.Option(help="FaceNet weights source or PATH.")] = "casia-webface-offline",
    serve: Annotated[bool, typer.Option(help="Finish with the Ray Serve identification demo.")] = True,
    keep_serving: Annotated[bool, typer.Option(help="Keep the service up after the demo (Ctrl-C stops).")] = False,
    port: Annotated[int, typer.Option(help="HTTP port of the service.")] = 8000,
    verbose: VerboseOption = False,
) -> None:
    """End to end on this machine: preprocess → train → evaluate vs bicubic → register + promote → serve."""
    with commands.output("quickstart", verbose):
        from ipsr_platform.cli.quickstart import run_quickstart

        run_quickstart(
            data=data,
            output=output,
            limit=limit,
            max_steps=max_steps,
            base_channels=base_channels,
            batch_size=batch_size,
            identity_weights=identity_weights,
            serve=serve,
            keep_serving=keep_serving,
            port=port,
        )


def main() -> None:
    run_main(app)
