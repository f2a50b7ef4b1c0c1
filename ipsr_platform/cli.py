"""The `ipsr` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ipsr_model.errors import UserError
from ipsr_platform import console

app = typer.Typer(
    name="ipsr",
    help="Identity-preserving super-resolution for low-resolution face recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
weights_app = typer.Typer(help="Identity-network (FaceNet) weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

VerboseOption = Annotated[bool, typer.Option("--verbose", help="Show Ray's and the libraries' logs live (default: "
                                                               "into a log file whose path is printed).")]


def _output(job: str, verbose: bool):
    """ipsr's own progress and tables on the terminal; the libraries' detail in a log file unless --verbose."""
    from ipsr_model.weights import ipsr_home

    return console.quiet(job, ipsr_home(), enabled=not verbose)


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
    hr_embeddings: Annotated[Optional[str], typer.Option(help="FaceNet weights: store each face's embedding for training.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with any option (< IPSR_PREPROCESS_* env < flags).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Detect and align faces with MTCNN on Ray Data: identity folders → 128×128 Parquet dataset + rejects."""
    with _output("preprocess", verbose):
        from ipsr_platform.config import PreprocessConfig, build_config
        from jobs.preprocess import run

        cfg = build_config(
            PreprocessConfig, env_prefix="IPSR_PREPROCESS_", yaml_file=config, input=input_, output=output,
            manifest=manifest, limit=limit, device=device, num_actors=num_actors, batch_size=batch_size, margin=margin,
            split=split, overwrite=overwrite, hr_embeddings=hr_embeddings,
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
    embedding_loss: Annotated[Optional[str], typer.Option(help="distance (Eq. 2, default) | mse | cosine | none.")] = None,
    residual: Annotated[Optional[bool], typer.Option("--residual/--no-residual", help="SR = bicubic + U-Net (default on).")] = None,
    identity_jitter: Annotated[Optional[float], typer.Option(help="Random view of SR/HR before FaceNet (default 0.05).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default 2e-4, beta1 0.5).")] = None,
    lr_warmup_steps: Annotated[Optional[int], typer.Option(help="Linear learning-rate warm-up steps (default 0).")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="constant (default) | cosine after warm-up.")] = None,
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
    verbose: VerboseOption = False,
) -> None:
    """Train the U-Net with Ray Train (DDP) on Ray Data, track in MLflow, register @candidate."""
    with _output("train", verbose):
        from ipsr_platform.config import TrainConfig, build_config
        from jobs.train import train as run_train

        cfg = build_config(
            TrainConfig, env_prefix="IPSR_TRAIN_", yaml_file=config, data=data, run_name=run_name, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, num_workers=num_workers, gpu=gpu, cpus_per_worker=cpus_per_worker,
            base_channels=base_channels, identity_weights=identity_weights, beta=beta, lr=lr, storage=storage,
            embedding_loss=embedding_loss, residual=residual, identity_jitter=identity_jitter,
            lr_warmup_steps=lr_warmup_steps, lr_schedule=lr_schedule,
            experiment=experiment, register_as=register_as, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, max_failures=max_failures, val_sizes=val_sizes, compile=compile_, seed=seed,
            val_identities=val_identities, log_every=log_every,
        )
        summary = run_train(cfg)
        if summary.get("already_finished"):
            console.say(f"run {summary['run_name']} already finished; nothing to do")
        val = ", ".join(f"{size} {value:.3f}" for size, value in summary["val_rank1"].items())
        console.say(
            f"run {summary['run_name']}: {summary['steps']} steps (resumed from step {summary['resumed_from_step']}); "
            f"val rank-1 {val}\nregistered {summary['model']} version {summary['model_version']} as "
            f"{summary['model_uri']} (MLflow run {summary['mlflow_run_id']})"
        )



@app.command()
def evaluate(
    data: Annotated[Optional[str], typer.Option(help="Identity folders, an `ipsr preprocess` output, or (scface) DIR with gallery/ + probes/.")] = None,
    protocol: Annotated[Optional[str], typer.Option(help="ar | scface | lfw | folder (default ar).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, run id or checkpoint path; repeatable.")] = None,
    sizes: Annotated[Optional[str], typer.Option(help="Probe sizes H×W, e.g. 11x8,16x12 (default per protocol).")] = None,
    identities: Annotated[Optional[str], typer.Option(help="Only identity folders matching these globs, e.g. 's3[1-9],s40'.")] = None,
    split: Annotated[Optional[str], typer.Option(help="test (default for an `ipsr preprocess` output: unseen identities) | val | train | all.")] = None,
    gallery_pattern: Annotated[Optional[str], typer.Option(help="Glob on file names for the gallery image (default first).")] = None,
    probe_pattern: Annotated[Optional[str], typer.Option(help="Glob on file names for probe images (default ar: second; lfw/folder: the rest).")] = None,
    probe_map: Annotated[Optional[str], typer.Option(help="scface: CSV path,identity,group instead of probes/<group>/.")] = None,
    gallery_group: Annotated[Optional[str], typer.Option(help="scface protocol 2: probe group used as the gallery.")] = None,
    concat_bicubic: Annotated[Optional[bool], typer.Option("--concat-bicubic/--no-concat-bicubic", help="Model rows embed bicubic ⊕ SR (default: scface only).")] = None,
    recognizers: Annotated[Optional[str], typer.Option(help="facenet,sface (default both).")] = None,
    identity_weights: Annotated[Optional[str], typer.Option(help="FaceNet weights source or PATH.")] = None,
    max_rank: Annotated[Optional[int], typer.Option(help="CMC up to this rank (default 100 or the gallery size).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Faces per forward pass (default 32).")] = None,
    output: Annotated[Optional[str], typer.Option(help="Folder for table.md, results.csv, cmc.png, samples (default $IPSR_HOME/evaluations/…).")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default ipsr-evaluate).")] = None,
    register_as: Annotated[Optional[str], typer.Option(help="Registered model name for --promote (default ipsr-unet).")] = None,
    promote: Annotated[Optional[bool], typer.Option("--promote", help="Move @champion to @candidate if it scores higher.")] = None,
    promote_recognizer: Annotated[Optional[str], typer.Option(help="Recognizer of the promotion metric (default sface).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with any option (< IPSR_EVALUATE_* env < flags).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Identification (rank-1, CMC) of HR / bicubic / SR probes with FaceNet and SFace; optional promotion."""
    with _output("evaluate", verbose):
        from ipsr_platform.config import EvaluateConfig, build_config
        from jobs.evaluate import print_summary, run as run_evaluate

        cfg = build_config(
            EvaluateConfig, env_prefix="IPSR_EVALUATE_", yaml_file=config, data=data, protocol=protocol,
            models=tuple(model) if model else None, sizes=sizes, identities=identities, split=split, gallery_pattern=gallery_pattern,
            probe_pattern=probe_pattern, probe_map=probe_map, gallery_group=gallery_group, concat_bicubic=concat_bicubic,
            recognizers=recognizers, identity_weights=identity_weights, max_rank=max_rank, batch_size=batch_size,
            output=output, experiment=experiment, register_as=register_as, promote=promote,
            promote_recognizer=promote_recognizer,
        )
        print_summary(run_evaluate(cfg))


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="models:/NAME@ALIAS (followed) or models:/NAME/VERSION (default models:/ipsr-unet@champion).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default 8000).")] = None,
    token_file: Annotated[Optional[str], typer.Option(help="File with the bearer token (else $IPSR_SERVE_TOKEN).")] = None,
    insecure_no_auth: Annotated[Optional[bool], typer.Option("--insecure-no-auth", help="No token: local use only.")] = None,
    identity_weights: Annotated[Optional[str], typer.Option(help="FaceNet weights source or PATH.")] = None,
    galleries: Annotated[Optional[str], typer.Option(help="Gallery store: path or s3:// (default $IPSR_HOME/galleries).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda")] = None,
    num_replicas: Annotated[Optional[int], typer.Option(help="Replicas (default 1).")] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(help="GPU share per replica (with --device cuda).")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Probes per SR + embedding batch (default 16; 1 = unbatched).")] = None,
    max_queued_requests: Annotated[Optional[int], typer.Option(help="Queued requests beyond which clients get 503 (default 64).")] = None,
    gallery_dtype: Annotated[Optional[str], typer.Option(help="float32 (default) | float16 gallery matrix on the replica.")] = None,
    allow_pickle_models: Annotated[Optional[bool], typer.Option("--allow-pickle-models", help="Load pickle-based model versions (runs their code).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with any option (< IPSR_SERVE_* env < flags).")] = None,
) -> None:
    """Serve gallery enrolment + batch identification (Ray Serve, FastAPI); blocks until Ctrl-C."""
    from ipsr_platform.config import ServeConfig, build_config
    from serving.app import serve_forever

    cfg = build_config(
        ServeConfig, env_prefix="IPSR_SERVE_", yaml_file=config, generator=model, host=host, port=port,
        token_file=token_file, insecure_no_auth=insecure_no_auth, identity_weights=identity_weights,
        galleries=galleries, device=device, num_replicas=num_replicas, gpus_per_replica=gpus_per_replica,
        max_batch_size=max_batch_size, max_queued_requests=max_queued_requests, gallery_dtype=gallery_dtype,
        allow_pickle_models=allow_pickle_models,
    )
    serve_forever(cfg, echo=typer.echo)

gallery_app = typer.Typer(help="Enrolled galleries of `ipsr serve` (the store, without a running service).",
                          no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")


@gallery_app.command("compact")
def gallery_compact(
    name: Annotated[str, typer.Argument(help="Gallery name.")],
    galleries: Annotated[Optional[str], typer.Option(help="Gallery store: path or s3:// (default $IPSR_HOME/galleries).")] = None,
) -> None:
    """Merge a gallery's segments and deletions into one segment; enrolments landing meanwhile are kept."""
    from ipsr_model.weights import ipsr_home
    from ipsr_platform.storage import Storage
    from serving.gallery import GalleryStore

    store = GalleryStore(galleries or str(ipsr_home() / "galleries"), Storage.from_env())
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
    forward_env: Annotated[Optional[list[str]], typer.Option(
        "--forward-env", help="Send this environment variable with the job (repeatable; it becomes readable in the "
        "job's record: the cluster should have its own credentials).")] = None,
) -> None:
    """Run a job on a Ray cluster through the Jobs API (token auth from RAY_AUTH_TOKEN / its token file)."""
    import json
    import os

    from ipsr_platform import submit as jobs_api

    submission = jobs_api.build_submission(job, ctx.args, config, forward_env or [],
                                           warn=lambda line: typer.echo(line, err=True))
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
    from ipsr_platform.submit import client

    for info in client(address).list_jobs():
        typer.echo(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption) -> None:
    from ipsr_platform.submit import client

    typer.echo(str(_job_call(lambda: client(address).get_job_status(job_id), job_id).value))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: AddressOption) -> None:
    from ipsr_platform.submit import client

    typer.echo(_job_call(lambda: client(address).get_job_logs(job_id), job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption) -> None:
    from ipsr_platform.submit import client

    stopped = _job_call(lambda: client(address).stop_job(job_id), job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


def _job_call(fn, job_id: str):
    from ipsr_platform.submit import API_ERRORS

    try:
        return fn()
    except API_ERRORS as err:  # the Jobs API answers an unknown id with a RuntimeError (HTTP 404)
        raise UserError(f"job {job_id}: {str(err).strip().splitlines()[0]}") from None


config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Annotated[Optional[Path], typer.Option(help="YAML: one job's options, or sections platform/<job>.")] = None,
    job: Annotated[Optional[list[str]], typer.Argument(help="Only these sections (default: all).")] = None,
) -> None:
    """Print what each job would run with: YAML file < IPSR_* environment (flags are per run, not shown)."""
    import os

    import yaml

    from ipsr_model.weights import ipsr_home
    from ipsr_platform import tracking
    from ipsr_platform.config import PLATFORM_ENV, SECTIONS, apply_platform, effective_config, job_configs, read_yaml

    jobs = job_configs()
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
        if name not in jobs:
            out.append(f"{name}: null  # not available in this version\n")
            continue
        model, prefix = jobs[name]
        values, problem = effective_config(model, prefix, config)
        text = yaml.safe_dump({name: values}, sort_keys=False)
        out.append(text + (f"# {name}: not runnable as is — {problem}\n" if problem else ""))
    typer.echo("\n".join(out).rstrip())


@app.command()
def quickstart(
    data: Annotated[Optional[Path], typer.Option(help="Identity folders DIR/<identity>/<image>; default: download LFW.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Where everything goes (default $IPSR_HOME/quickstart).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N images (sorted by identity).")] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="Training steps (~1.5 s each at the defaults on 2 CPUs).")] = 120,
    base_channels: Annotated[int, typer.Option(min=1, help="U-Net width (64 = paper; small for CPU).")] = 16,
    batch_size: Annotated[int, typer.Option(min=2, help="Faces per training step.")] = 16,
    identity_weights: Annotated[str, typer.Option(help="FaceNet weights source or PATH.")] = "casia-webface-offline",
    serve: Annotated[bool, typer.Option(help="Finish with the Ray Serve identification demo.")] = True,
    keep_serving: Annotated[bool, typer.Option(help="Keep the service up after the demo (Ctrl-C stops).")] = False,
    port: Annotated[int, typer.Option(help="HTTP port of the service.")] = 8000,
    verbose: VerboseOption = False,
) -> None:
    """End to end on this machine: preprocess → train → evaluate vs bicubic → register + promote → serve."""
    with _output("quickstart", verbose):
        from ipsr_platform.quickstart import run_quickstart

        run_quickstart(
            data=data, output=output, limit=limit, max_steps=max_steps, base_channels=base_channels,
            batch_size=batch_size, identity_weights=identity_weights, serve=serve, keep_serving=keep_serving, port=port,
        )


def main() -> None:
    try:
        app()
    except UserError as err:
        console.say(f"error: {err}", error=True)
        sys.exit(2)
    except Exception:
        log = console.log_file()
        if log is not None:  # the traceback also goes into the log, after the detail that led to it
            import traceback

            with open(log, "a", encoding="utf-8") as file:
                traceback.print_exc(file=file)
            console.say(f"(what led to the error below is in {log})", error=True)
        raise
