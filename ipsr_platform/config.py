"""Job configurations: one pydantic model per job, built from YAML file < ``IPSR_<JOB>_*`` env < CLI flags.

Validation happens here, once, so a bad value fails before any cluster work starts and the user sees one line
naming the field (``UserError``), not a traceback from deep inside a Ray task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ipsr_model.errors import UserError

M = TypeVar("M", bound=BaseModel)

SPLITS = ("train", "val", "test")


def parse_split(value: str | dict[str, float] | None) -> dict[str, float]:
    """``"val=0.02,test=0.02"`` (or a mapping) → ``{"val": 0.02, "test": 0.02}``; train gets the rest."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
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
        if not 0.0 <= f < 1.0:
            raise ValueError(f"fraction of {name} must be in [0, 1), got {f}")
        out[name] = f
    if sum(out.values()) >= 1.0:
        raise ValueError(f"val + test fractions must leave something for train, got {out}")
    return out


class PreprocessConfig(BaseModel):
    """``ipsr preprocess``: identity folders → aligned 128×128 faces (Parquet) + rejects + manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Identity folders SRC/<identity>/<file>: local path or s3://bucket/prefix.")
    output: str = Field(description="Dataset destination: local path or s3://bucket/prefix.")
    manifest: str | None = Field(
        None, description="Optional list of inputs (.txt: one path per line; .parquet: column 'path', optional "
        "'identity'); relative paths are under `input`. Skips listing."
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


def build_config(model: type[M], *, env_prefix: str, yaml_file: str | Path | None = None, **flags: Any) -> M:
    """YAML file < environment (``{env_prefix}{FIELD}``) < flags that are not None; errors → ``UserError``.

    Without a file, the YAML text in ``$IPSR_CONFIG_YAML`` is used: that is how ``ipsr submit --config`` ships a
    config file to a cluster job without a shared filesystem.
    """
    data: dict[str, Any] = {}
    if yaml_file is not None:
        path = Path(yaml_file)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        data.update(_load_yaml(path.read_text(), f"config file {path}"))
    elif os.environ.get("IPSR_CONFIG_YAML"):
        data.update(_load_yaml(os.environ["IPSR_CONFIG_YAML"], "the config in $IPSR_CONFIG_YAML"))
    for name in model.model_fields:
        env = os.environ.get(f"{env_prefix}{name.upper()}")
        if env is not None:
            data[name] = env
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise UserError(f"invalid {model.__name__}: {problems}") from None


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


class TrainConfig(BaseModel):
    """``ipsr train``: U-Net on a preprocessed dataset with Ray Train; defaults follow the paper's official code
    (Adam lr 2e-4, β1 0.5, batch 64 per worker, β = 5, 128×128)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    lr: float = Field(2e-4, gt=0, le=1.0)
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
        import re

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
        if self.max_steps is not None:
            return None
        return self.epochs if self.epochs is not None else 10
