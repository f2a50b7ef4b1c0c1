"""Load a trained generator from wherever it lives: the registry, an MLflow run, or a checkpoint on disk.

Accepted specs
--------------
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    A registered version (``ipsr train`` logs pt2: a torch.export program, no pickle).
``<32 hex>`` (an MLflow run id), ``runs:/<id>/generator``
    The generator logged by that run.
a path
    A plain ``UNetGenerator`` state dict (``.pt``), a training ``state.pt`` (``{"generator": ...}``) or a
    training checkpoint directory holding one. Loaded with ``weights_only=True``; the width is read off the
    first convolution, the residual flag off the state dict's ``_extra_state``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ipsr_model import checkpoint
from ipsr_model.errors import UserError, first_line
from ipsr_platform import tracking

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


@dataclass
class LoadedGenerator:
    module: torch.nn.Module  # maps [-1, 1] 128×128 NCHW batches to the same; already in eval behaviour
    spec: str  # what the user gave
    label: str  # short, MLflow-safe name for tables and metric keys
    name: str | None = None  # registered model name and version, when it came from the registry
    version: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def load_generator(spec: str, uri: str | None = None, *, allow_pickle: bool = False) -> LoadedGenerator:
    """Resolve ``spec`` (see the module docstring) and load the generator; UserError when it can't be found, or when
    an MLflow model is pickle-based and ``allow_pickle`` is off (unpickling runs code the model's author chose)."""
    spec = spec.strip()
    match = _MODELS_URI.fullmatch(spec)
    if match:
        return _from_registry(
            spec, match["name"], match["alias"], match["version"], uri or tracking.tracking_uri(), allow_pickle
        )
    if _RUN_ID.fullmatch(spec) or spec.startswith("runs:/"):
        return _from_run(spec, uri or tracking.tracking_uri(), allow_pickle)
    if spec.startswith(("models:", "runs:")):
        raise UserError(f"model {spec!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/generator")
    return _from_path(spec)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (NAME, ALIAS, None); ``models:/NAME/VERSION`` → (NAME, None, VERSION)."""
    match = _MODELS_URI.fullmatch(uri.strip())
    if not match:
        raise UserError(f"model must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    return match["name"], match["alias"], match["version"]


def _mlflow_load(model_uri: str, uri: str, allow_pickle: bool = False) -> torch.nn.Module:
    import tempfile

    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with tempfile.TemporaryDirectory(prefix="ipsr-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
            if not (local / "data" / "model.pt2").is_file() and not allow_pickle:
                raise UserError(
                    f"{model_uri} is saved in a pickle-based format: loading it would run code stored with it. ipsr "
                    "writes pt2 (torch.export); pass --allow-pickle-models only for a model you trust"
                )
            module = mlflow.pytorch.load_model(str(local), map_location="cpu")
    except MlflowException as err:
        raise UserError(f"cannot load {model_uri} from {uri}: {first_line(err)}") from None
    # A pt2 program was exported in eval mode and can't switch; a pickled nn.Module can and must.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        module.eval()
    return module


def _from_registry(
    spec: str, name: str, alias: str | None, version: str | None, uri: str, allow_pickle: bool = False
) -> LoadedGenerator:
    from mlflow.exceptions import MlflowException

    if alias is not None:
        mv = tracking.version_for_alias(name, alias, uri)
    else:
        try:
            mv = tracking.client(uri).get_model_version(name, version)
        except MlflowException:
            raise UserError(f"no registered model version {name}/{version} in {uri}") from None
    module = _mlflow_load(f"models:/{name}/{mv.version}", uri, allow_pickle)
    return LoadedGenerator(
        module,
        spec,
        _safe(f"{name}-v{mv.version}"),
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        tags=dict(mv.tags or {}),
    )


def _from_run(spec: str, uri: str, allow_pickle: bool = False) -> LoadedGenerator:
    run_id = spec if _RUN_ID.fullmatch(spec) else spec.removeprefix("runs:/").split("/")[0]
    model_uri = spec if spec.startswith("runs:/") else f"runs:/{run_id}/generator"
    if not tracking.run_exists(run_id, uri):
        raise UserError(f"model {spec!r}: no MLflow run {run_id} in {uri}")
    return LoadedGenerator(_mlflow_load(model_uri, uri, allow_pickle), spec, _safe(f"run-{run_id[:8]}"), run_id=run_id)


def _from_path(spec: str) -> LoadedGenerator:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / checkpoint.STATE_FILE  # a training checkpoint directory
    if not path.is_file():
        raise UserError(f"model {spec!r}: no such file, run id or models:/ URI")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything unloadable is "not a weights-only checkpoint"
        raise UserError(f"model {spec!r}: not a weights-only torch checkpoint ({type(err).__name__})") from None
    state = obj.get("generator", obj) if isinstance(obj, dict) else {}
    try:
        generator = checkpoint.generator_from_state(state)
    except ValueError as err:
        raise UserError(f"model {spec!r}: {err}") from None
    label = path.parent.name if path.name == checkpoint.STATE_FILE else path.stem
    return LoadedGenerator(generator.eval(), spec, _safe(label))


def _safe(text: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces; labels use the first four."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]
