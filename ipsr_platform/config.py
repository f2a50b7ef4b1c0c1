"""Job configurations: one pydantic model per job, built from YAML file < ``IPSR_<JOB>_*`` env < CLI flags.

Validation happens here, once, so a bad value fails before any cluster work starts and the user sees one line
naming the field (``UserError``), not a traceback from deep inside a Ray task.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ipsr_model.degradation import BACK_PROJECTION_STEPS
from ipsr_model.errors import UserError

M = TypeVar("M", bound=BaseModel)

# Evaluation, `ipsr identify` and `ipsr serve` restore an LR probe the same way: the model, then these steps.
BackProjection = Annotated[
    int,
    Field(
        ge=0,
        le=20,
        description="Back-projection steps after the model, toward the LR probe at its own size (0: none; "
        "see ipsr_model.degradation.back_project).",
    ),
]

SPLITS = ("train", "val", "test")


def parse_split(value: str | dict[str, float] | None) -> dict[str, float]:
    """``"val=0.02,test=0.02"`` (or a mapping) → ``{"val": 0.02, "test": 0.02}``; train gets the rest (maybe none)."""
    if value is None or value == "":
        return {}
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    else:
        for part in str(value).split(","):
            name, sep, frac = part.partition("=")
            if not sep:
                raise ValueError(f"expected NAME=FRACTION pairs like 'val=0.02,test=0.02', got {part.strip()!r}")
            items.append((name.strip(), frac.strip()))
    out: dict[str, float] = {}
    for name, frac in items:
        if name not in ("val", "test"):
            raise ValueError(f"unknown split {name!r}: only val and test take a fraction (train gets the rest)")
        try:
            f = float(frac)
        except (TypeError, ValueError):
            raise ValueError(f"fraction of {name} is not a number: {frac!r}") from None
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction of {name} must be in [0, 1], got {f}")
        out[name] = f
    # Up to 1: "test=1.0" makes a whole dataset unseen test identities (evaluation-only data).
    if sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f"val + test fractions must sum to at most 1, got {out}")
    return out


class Strict(BaseModel):
    """Every config: an unknown key is an error (a misspelt flag or YAML key is never ignored), and a built
    config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(Strict):
    """``ipsr preprocess``: identity folders → aligned 128×128 faces (Parquet) + rejects + manifest."""

    input: str = Field(description="Identity folders SRC/<identity>/<file>: local path or s3://bucket/prefix.")
    output: str = Field(description="Dataset destination: local path or s3://bucket/prefix.")
    manifest: str | None = Field(
        None,
        description="Optional list of inputs (.txt: one path per line; .parquet: column "
        "'path', optional 'identity'); relative paths are under `input`. Skips listing.",
    )
    limit: int | None = Field(None, ge=1, description="Process only the first N inputs (sorted by identity, path).")
    device: Literal["cpu", "cuda"] = "cpu"
    num_actors: int | None = Field(None, ge=1, description="MTCNN actors; default one per CPU (cpu) or GPU (cuda).")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per MTCNN call.")
    margin: int = Field(16, ge=0, le=96, description="Context around the face, in pixels of the 128×128 output.")
    split: dict[str, float] = Field(
        default_factory=lambda: {"val": 0.02, "test": 0.02}, description="Fractions of identities for val/test."
    )
    overwrite: bool = False
    # Detection runs on a letterboxed detect_size² copy (same size → real batches); crops come from the original.
    detect_size: int = Field(160, ge=48, le=2048)
    min_face_size: int = Field(20, ge=8, description="Smallest face MTCNN looks for, in detect_size pixels.")
    max_pixels: int = Field(25_000_000, ge=1, description="Larger declared images are rejected before decoding.")
    max_bytes: int = Field(64 * 2**20, ge=1, description="Larger files are rejected without reading them.")
    rows_per_shard: int = Field(4096, ge=1, description="Faces per output Parquet file.")
    io_threads: int = Field(16, ge=1, le=256, description="Concurrent reads per read task (S3 latency).")
    object_store_mb: int | None = Field(
        None,
        ge=64,
        description="Object-store budget of the pipeline in MiB (default "
        "256 per actor, at least 512): reads faster than the aligners wait instead of "
        "queueing up the dataset.",
    )
    hr_embeddings: str | None = Field(
        None,
        description="FaceNet weights source: also store each face's embedding "
        "(column hr_embedding), which `ipsr train` uses instead of the HR forward when "
        "its weights' sha256 match and identity jitter is 0.",
    )

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, value: Any) -> dict[str, float]:
        return parse_split(value)

    @model_validator(mode="after")
    def _paths(self) -> PreprocessConfig:
        if not self.input.strip() or not self.output.strip():
            raise ValueError("input and output must not be empty")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from input")
        if self.manifest and not self.manifest.endswith((".txt", ".parquet")):
            raise ValueError(f"manifest must be a .txt or .parquet file, got {self.manifest!r}")
        return self


class ImageJob(Strict):
    """What `ipsr enrol` and `ipsr identify` share: a Ray Data actor pool over image files, and reading limits."""

    device: Literal["cpu", "cuda"] = "cpu"
    num_actors: int | None = Field(None, ge=1, description="Model actors; default one per CPU (cpu) or GPU (cuda).")
    max_pixels: int = Field(16_000_000, ge=1, description="Larger declared images are rejected before decoding.")
    max_bytes: int = Field(64 * 2**20, ge=1, description="Larger files are rejected without reading them.")
    io_threads: int = Field(16, ge=1, le=256, description="Concurrent reads per read task (S3 latency).")


class EnrolConfig(ImageJob):
    """``ipsr enrol``: identity folders (or a preprocess output) → FaceNet embeddings → new gallery segments."""

    input: str = Field(
        description="Identity folders SRC/<identity>/<file> (local or s3://), or an `ipsr preprocess` output."
    )
    gallery: str = Field(description="Gallery name (created when new; faces already in it are skipped).")
    galleries: str | None = Field(None, description="Gallery store: path or s3:// (default $IPSR_HOME/galleries).")
    identity_weights: str = Field("casia-webface-offline", description="FaceNet weights source or path.")
    aligned: bool = Field(
        False, description="Inputs are face crops already: centre square, no MTCNN (as `ipsr serve`'s aligned=true)."
    )
    manifest: str | None = Field(
        None, description="Optional list of inputs (.txt or .parquet, as `ipsr preprocess --manifest`)."
    )
    limit: int | None = Field(None, ge=1, description="Enrol only the first N inputs (sorted by identity, path).")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per alignment and FaceNet call.")
    rows_per_segment: int = Field(4096, ge=1, description="Faces per new gallery segment (one immutable file).")
    rejects: str | None = Field(
        None, description="Where to write the rejected inputs (Parquet; default a file in $IPSR_HOME/logs)."
    )

    @model_validator(mode="after")
    def _checks(self) -> EnrolConfig:
        if not self.input.strip():
            raise ValueError("input must not be empty")
        if self.manifest and not self.manifest.endswith((".txt", ".parquet")):
            raise ValueError(f"manifest must be a .txt or .parquet file, got {self.manifest!r}")
        return self


class IdentifyConfig(ImageJob):
    """``ipsr identify``: probe images → (SR →) FaceNet → top-k identities of a gallery, as Parquet + CSV."""

    probes: str = Field(description="Probe images: a folder or s3:// prefix, searched recursively.")
    gallery: str = Field(description="Gallery to search (built by `ipsr enrol` or `ipsr serve`'s enrolment).")
    out: str = Field(description="Output folder (path or s3://): matches.parquet, matches.csv, rejects, sr/.")
    # Not called `model` (build_config's first parameter); the CLI flag is --model, as `ipsr serve`'s.
    generator: str = Field(
        "models:/ipsr-unet@champion",
        description="U-Net: models:/NAME@ALIAS or /VERSION, an MLflow run id, or a checkpoint path.",
        json_schema_extra={"flag": "--model"},
    )
    top_k: int = Field(5, ge=1, le=1000, description="Matches per probe.")
    save_sr: bool = Field(False, description="Also write each probe's embedded 128×128 face as OUT/sr/<probe>.png.")
    aligned: bool = Field(
        False, description="Probes larger than lr_max_side are face crops already: no MTCNN (as `ipsr serve`)."
    )
    super_resolve: Literal["auto", "true", "false"] = Field(
        "auto", description="auto: only low-resolution probes (both sides ≤ lr_max_side) are super-resolved."
    )
    lr_max_side: int = Field(127, ge=1, le=127, description="Probes at most this large on both sides are LR.")
    back_projection: BackProjection = BACK_PROJECTION_STEPS
    galleries: str | None = Field(None, description="Gallery store: path or s3:// (default $IPSR_HOME/galleries).")
    identity_weights: str = Field("casia-webface-offline", description="FaceNet weights source or path.")
    gallery_dtype: Literal["auto", "float16", "float32"] = Field(
        "auto",
        description="Gallery matrix in the actors. auto: float16 on cuda; float32 on cpu, where a batch's search "
        "in float16 is ~3x slower (no native half GEMM; bench/RESULTS.md).",
    )
    gallery_chunk: int = Field(65536, ge=1, description="Gallery rows per matrix product.")
    allow_pickle_models: bool = Field(False, description="Load a model saved in a pickle-based format.")
    overwrite: bool = Field(False, description="Replace the results of an earlier run in --out.")
    limit: int | None = Field(None, ge=1, description="Search only the first N probes (sorted by path).")
    batch_size: int = Field(32, ge=1, le=4096, description="Probes per SR + FaceNet + search call.")

    @model_validator(mode="after")
    def _checks(self) -> IdentifyConfig:
        if not self.probes.strip() or not self.out.strip():
            raise ValueError("probes and out must not be empty")
        return self


def build_config(model: type[M], *, env_prefix: str, yaml_file: str | Path | None = None, **flags: Any) -> M:
    """YAML file < environment (``{env_prefix}{FIELD}``) < flags that are not None; errors → ``UserError``.

    Without a file, the YAML text in ``$IPSR_CONFIG_YAML`` is used: that is how ``ipsr submit --config`` ships a
    config file to a cluster job without a shared filesystem. The file is either one job's options (flat) or the
    whole platform's, in sections (see ``SECTIONS``); then this job reads its own section and ``platform``
    fills the platform's environment variables that are not set.
    """
    try:
        return model.model_validate(_merged(model, env_prefix, yaml_file, flags))
    except ValidationError as err:
        raise UserError(f"invalid {model.__name__}: {_problems(err)}") from None


def effective_config(
    model: type[BaseModel], env_prefix: str, yaml_file: str | Path | None = None
) -> tuple[dict[str, Any], str | None]:
    """What a job would run with (YAML < env, defaults filled in) and, when it would not validate, why."""
    data = _merged(model, env_prefix, yaml_file, {})
    try:
        return model.model_validate(data).model_dump(mode="json"), None
    except ValidationError as err:
        shown = {
            name: data.get(name, None if field.is_required() else field.get_default(call_default_factory=True))
            for name, field in model.model_fields.items()
        }
        return shown, _problems(err)


# One file for the whole platform: `platform` (where things run) and one section per job.
SECTIONS = ("platform", "preprocess", "train", "evaluate", "serve", "enrol", "identify")


class PlatformConfig(Strict):
    """Where jobs run and track. Each field is also its usual environment variable, which wins over YAML."""

    ray_address: str | None = Field(None, description="RAY_ADDRESS: a cluster to join; unset = local Ray.")
    mlflow_tracking_uri: str | None = Field(None, description="MLFLOW_TRACKING_URI; unset = SQLite in home.")
    s3_endpoint_url: str | None = Field(None, description="AWS_ENDPOINT_URL: S3-compatible store (MinIO…).")
    home: str | None = Field(None, description="IPSR_HOME: weights, embedded MLflow, runs, galleries.")


PLATFORM_ENV = {
    "ray_address": "RAY_ADDRESS",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "s3_endpoint_url": "AWS_ENDPOINT_URL",
    "home": "IPSR_HOME",
}


def job_configs() -> dict[str, tuple[type[BaseModel], str]]:
    """section → (config model, env prefix) for every job."""
    models: dict[str, type[BaseModel]] = {
        "preprocess": PreprocessConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "serve": ServeConfig,
        "enrol": EnrolConfig,
        "identify": IdentifyConfig,
    }
    return {job: (model, f"IPSR_{job.upper()}_") for job, model in models.items()}


def _merged(model: type[BaseModel], env_prefix: str, yaml_file: str | Path | None, flags: dict) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if yaml_file is not None:
        data.update(_job_section(read_yaml(yaml_file), env_prefix, str(yaml_file)))
    elif text := os.environ.get("IPSR_CONFIG_YAML"):
        data.update(_job_section(_load_yaml(text, "the config in $IPSR_CONFIG_YAML"), env_prefix, "$IPSR_CONFIG_YAML"))
    env = {name: os.environ.get(f"{env_prefix}{name.upper()}") for name in model.model_fields}
    data.update({name: value for name, value in env.items() if value is not None})
    data.update({k: v for k, v in flags.items() if v is not None})
    return data


def _job_section(loaded: dict[str, Any], env_prefix: str, where: str) -> dict[str, Any]:
    if not any(key in SECTIONS for key in loaded):
        return loaded  # one job's options
    if unknown := sorted(set(loaded) - set(SECTIONS)):
        raise UserError(f"{where}: unknown sections {unknown}; expected {', '.join(SECTIONS)}")
    apply_platform(loaded.get("platform") or {}, where)
    section = loaded.get(env_prefix.removeprefix("IPSR_").rstrip("_").lower()) or {}
    if not isinstance(section, dict):
        raise UserError(f"{where}: each section must be a mapping of option: value")
    return section


def apply_platform(values: dict[str, Any], where: str) -> None:
    """Validate the ``platform`` section and export it to the environment variables that are still unset."""
    try:
        platform = PlatformConfig.model_validate(values)
    except ValidationError as err:
        raise UserError(f"{where}: invalid platform section: {_problems(err)}") from None
    for field, env in PLATFORM_ENV.items():
        value = getattr(platform, field)
        if value is not None and not os.environ.get(env):
            os.environ[env] = str(value)


def _problems(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
        for e in err.errors()
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return _load_yaml(path.read_text(), f"config file {path}")


def _load_yaml(text: str, what: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{what} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{what} must hold a mapping of option: value")
    return loaded


def parse_sizes(value: str | list | tuple) -> tuple[str, ...]:
    """``"16x12,21x15"`` (or a list) → ``("16x12", "21x15")``, each checked as H×W."""
    from ipsr_model.degradation import format_size, parse_size

    items = value.split(",") if isinstance(value, str) else list(value)
    sizes = tuple(format_size(parse_size(str(item).strip())) for item in items if str(item).strip())
    if not sizes:
        raise ValueError("need at least one size like 16x12")
    return sizes


class TrainConfig(Strict):
    """``ipsr train``: U-Net on a preprocessed dataset with Ray Train; defaults follow the paper's official code
    (Adam lr 2e-4, β1 0.5, batch 64 per worker, β = 5, 128×128)."""

    data: str = Field(description="Output of `ipsr preprocess` (local path or s3://), with _SUCCESS.")
    run_name: str = Field(description="Names the run: storage folder, MLflow run; rerun it to resume.")
    epochs: int | None = Field(None, ge=1, description="Passes over the train split (default 10).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps instead of --epochs.")
    batch_size: int = Field(64, ge=1, le=4096, description="Faces per worker and step.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    gpu: bool = Field(False, description="One GPU per worker; bf16 autocast + channels_last.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each training worker claims; default leaves CPUs to Ray Data ingest."
    )
    base_channels: int = Field(64, ge=1, le=512, description="U-Net width (64 = paper).")
    identity_weights: str = Field("casia-webface-offline", description="FaceNet weights source or path.")
    beta: float = Field(5.0, ge=0, description="Weight of the pixel MSE: L = L_embedding + beta * L_pixel.")
    embedding_loss: Literal["distance", "mse", "cosine", "none"] = Field(
        "none",
        description="L_embedding: none (pixel only: the default, chosen on unseen identities at equal compute, "
        "bench/RESULTS.md), mse (per element: the paper's text and code), distance (paper Eq. 2), cosine.",
    )
    residual: bool = Field(True, description="SR = clamp(bicubic + U-Net(bicubic)), last layer zero-initialised.")
    identity_jitter: float = Field(
        0.0, ge=0, lt=0.5, description="FaceNet sees SR/HR pairs under one random shift/scale/flip of this size."
    )
    lr: float = Field(2e-4, gt=0, le=1.0)
    lr_warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warm-up: constant or cosine to 10 %."
    )
    storage: str | None = Field(None, description="Checkpoints: local path or s3:// (default $IPSR_HOME/runs).")
    experiment: str = Field("ipsr-train", min_length=1, description="MLflow experiment.")
    register_as: str = Field("ipsr-unet", min_length=1, description="Registered model name.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (also at every epoch end).")
    keep_checkpoints: int = Field(3, ge=1, description="Best checkpoints kept, by validation rank-1.")
    max_failures: int = Field(3, ge=-1, description="Worker failures survived (restart from the last checkpoint).")
    val_sizes: tuple[str, ...] = Field(("16x12", "21x15", "32x32"), description="Validation probe sizes (H×W).")
    val_identities: int = Field(256, ge=2, description="At most this many val identities (gallery + probe each).")
    grid_faces: int = Field(4, ge=1, le=32, description="Val faces in the per-epoch PNG grid.")
    log_every: int = Field(10, ge=1, description="Steps between logged loss / throughput values.")
    shuffle_buffer: int = Field(256, ge=0, description="Rows in each worker's local shuffle buffer (0 = off).")
    compile: bool = Field(False, description="torch.compile the generator (GPU).")
    seed: int = 0

    @field_validator("val_sizes", mode="before")
    @classmethod
    def _val_sizes(cls, value: Any) -> tuple[str, ...]:
        return parse_sizes(value)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
            raise ValueError(f"use letters, digits, '.', '_' or '-' (it names a folder), got {value!r}")
        return value

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give --epochs or --max-steps, not both")
        if not self.data.strip():
            raise ValueError("data must not be empty")
        return self

    @property
    def num_epochs(self) -> int | None:
        """Epochs to run, None when --max-steps decides."""
        return None if self.max_steps is not None else self.epochs or 10  # epochs >= 1 when given


# Probe sizes (H×W) of the paper's tables: AR (Table I) and LFW (Table IV).
AR_SIZES = ("11x8", "16x12", "16x16", "21x15", "32x32")
LFW_SIZES = ("7x6", "14x12", "16x14", "18x16")


class EvaluateConfig(Strict):
    """``ipsr evaluate``: identification (rank-1, CMC) of HR, bicubic and super-resolved probes against an HR gallery,
    with the training FaceNet and an independent recognizer (SFace); optionally promotes ``candidate`` to
    ``champion``."""

    data: str = Field(
        description="ar/lfw/folder: identity folders DIR/<identity>/<image> or an `ipsr preprocess` output "
        "(MTCNN-aligned Parquet); scface: DIR with gallery/<identity>/ and probes/<group>/<identity>/."
    )
    protocol: Literal["ar", "scface", "lfw", "folder"] = Field("ar", description="Evaluation protocol.")
    models: tuple[str, ...] = Field(
        (),
        description="Generators to compare: models:/name@alias, models:/name/version, an MLflow run id or a "
        "checkpoint path (state dict .pt or a training checkpoint directory).",
        json_schema_extra={"flag": "--model", "multiple": True},
    )
    sizes: tuple[str, ...] | None = Field(
        None, description="Probe sizes H×W (synthetic protocols); default: AR 11x8..32x32, LFW 7x6..18x16."
    )
    identities: str | None = Field(
        None, description="Only identities whose folder name matches one of these comma-separated globs (s3[1-9],s40)."
    )
    split: Literal["train", "val", "test", "all"] | None = Field(
        None,
        description="With an `ipsr preprocess` output "
        "as --data: only this split's identities (default "
        "test: the unseen ones; all = every split).",
    )
    gallery_pattern: str | None = Field(
        None, description="Glob on file names picking the gallery image (default first)."
    )
    probe_pattern: str | None = Field(
        None,
        description="Glob on file names picking the probe image(s) (default: "
        "ar the second image, lfw/folder every other image).",
    )
    probe_map: str | None = Field(None, description="scface: CSV with columns path,identity,group instead of probes/.")
    gallery_group: str | None = Field(None, description="scface protocol 2: the probe group used as gallery.")
    concat_bicubic: bool | None = Field(
        None,
        description="Model rows embed bicubic ⊕ SR (concatenated) as the paper does for SCface (default: scface only).",
    )
    back_projection: BackProjection = BACK_PROJECTION_STEPS
    recognizers: tuple[Literal["facenet", "sface"], ...] = Field(("facenet", "sface"), description="Recognizers.")
    identity_weights: str = Field("casia-webface-offline", description="FaceNet weights source or path.")
    max_rank: int = Field(100, ge=1, description="CMC up to this rank (or the gallery size).")
    batch_size: int = Field(32, ge=1, le=4096, description="Faces per forward pass.")
    grid_faces: int = Field(6, ge=1, le=64, description="Faces in each sample grid.")
    output: str | None = Field(
        None, description="Local folder for the tables and plots (default $IPSR_HOME/evaluations/…)."
    )
    experiment: str = Field("ipsr-evaluate", min_length=1, description="MLflow experiment.")
    register_as: str = Field("ipsr-unet", min_length=1, description="Registered model name (for --promote).")
    promote: bool = Field(False, description="Move `champion` to `candidate` if it beats it on the promotion metric.")
    promote_recognizer: Literal["facenet", "sface"] = Field("sface", description="Recognizer of the promotion metric.")

    @field_validator("sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> tuple[str, ...] | None:
        return None if value is None else parse_sizes(value)

    @field_validator("models", "recognizers", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # env / YAML: "a,b"
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.data.strip():
            raise ValueError("data must not be empty")
        if not self.recognizers:
            raise ValueError("need at least one recognizer")
        if self.promote and self.promote_recognizer not in self.recognizers:
            raise ValueError(f"--promote scores with {self.promote_recognizer}, which is not among --recognizers")
        if self.protocol == "scface" and self.sizes is not None:
            raise ValueError("scface probes are natural low-resolution images: --sizes does not apply")
        if self.protocol != "scface" and (self.probe_map or self.gallery_group):
            raise ValueError("--probe-map and --gallery-group belong to the scface protocol")
        return self

    @property
    def probe_sizes(self) -> tuple[str, ...]:
        return self.sizes or (LFW_SIZES if self.protocol == "lfw" else AR_SIZES)  # sizes is never empty

    @property
    def concat(self) -> bool:
        return self.protocol == "scface" if self.concat_bicubic is None else self.concat_bicubic


class ServeConfig(Strict):
    """``ipsr serve``: Ray Serve batch identification (gallery enrolment, SR + embedding + top-k matching)."""

    # Not called `model`: build_config's first parameter has that name. The CLI flag is --model.
    generator: str = Field(
        "models:/ipsr-unet@champion",
        description="U-Net to serve: models:/NAME@ALIAS (followed) or models:/NAME/VERSION.",
        json_schema_extra={"flag": "--model"},
    )
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=0, le=65535)
    token_file: str | None = Field(
        None,
        description="File of accepted bearer tokens, one per line, re-read by the replicas when it changes "
        "(token rollover without a restart); else $IPSR_SERVE_TOKEN (comma-separated).",
    )
    insecure_no_auth: bool = Field(False, description="Serve without a token (local use only).")
    identity_weights: str = Field("casia-webface-offline", description="FaceNet weights source or path.")
    galleries: str | None = Field(None, description="Gallery store: path or s3:// (default $IPSR_HOME/galleries).")
    device: Literal["cpu", "cuda"] = "cpu"
    num_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(
        0.0, ge=0, description="GPU share per replica with --device cuda (default: 1 whole GPU)."
    )
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads per replica (default: its CPUs).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Probes per SR + embedding batch (1 = unbatched).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent requests per replica (>= max_batch_size).")
    max_queued_requests: int = Field(64, ge=1, description="Requests waiting beyond that; more are answered 503.")
    max_body_bytes: int = Field(32 * 2**20, ge=1, description="Larger request bodies are answered 413.")
    max_images: int = Field(64, ge=1, description="Images per request.")
    max_image_bytes: int = Field(8 * 2**20, ge=1)
    max_image_pixels: int = Field(16_000_000, ge=1, description="Larger declared images are rejected undecoded.")
    lr_max_side: int = Field(
        127,
        ge=1,
        le=127,
        description="Probes at most this large on both sides are low-resolution "
        "(default: anything below the model's 128x128 on every side, e.g. the paper's 112x96).",
    )
    back_projection: BackProjection = BACK_PROJECTION_STEPS
    max_request_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Declared pixels of all images of one request, "
        "summed; images beyond are rejected undecoded (bounds a request's memory).",
    )
    gallery_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="Gallery matrix on the replica: float16 halves its memory and, matching being "
        "memory-bound, its scan time (bench/RESULTS.md: 1 probe vs 1M faces p50 134 vs 286 ms on 2 CPUs).",
    )
    allow_pickle_models: bool = Field(
        False, description="Load model versions saved in a pickle-based format (their code runs on load)."
    )
    top_k: int = Field(5, ge=1, le=1000, description="Default matches per probe.")
    gallery_chunk: int = Field(65536, ge=1, description="Gallery rows per matrix product.")
    gallery_refresh_s: float = Field(
        5.0,
        ge=0,
        description="Seconds between a replica's background checks for what "
        "others enrolled or removed (0: on every request).",
    )
    model_poll_s: float = Field(30.0, gt=0, description="Seconds between alias look-ups (alias moves hot-swap).")
    request_timeout_s: float = Field(60.0, gt=0)
    drain_s: float = Field(
        30.0, ge=0, le=600, description="On SIGTERM or Ctrl-C: seconds in-flight requests get to finish before exit."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size (else batches never fill)")
        if not self.generator.startswith("models:/"):
            raise ValueError(
                f"--model must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {self.generator!r}"
            )
        if self.device == "cpu" and self.gpus_per_replica:
            raise ValueError("gpus_per_replica needs --device cuda")
        return self
