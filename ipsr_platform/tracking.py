"""MLflow tracking and model registry for ipsr jobs.

Where runs go: ``$MLFLOW_TRACKING_URI`` when set (a tracking server for clusters), otherwise the embedded
default, a SQLite database at ``$IPSR_HOME/mlflow.db`` with artifacts under ``$IPSR_HOME/mlartifacts/``. The
embedded store is for one machine: on a multi-node cluster set ``MLFLOW_TRACKING_URI`` to a server every node
can reach (a SQLite file on the driver's disk is invisible to workers elsewhere).

Registry conventions (DESIGN.md): model ``ipsr-unet`` (configurable), alias ``candidate`` = last trained,
``champion`` = serving; every version carries the data manifest hash, the identity-net sha256 and the git commit.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from ipsr_model.errors import UserError, first_line
from ipsr_model.paths import mlflow_artifacts, mlflow_db

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"

# Tag keys on runs and model versions.
TAG_RUN_NAME = "ipsr.run_name"
TAG_DATA_MANIFEST = "data_manifest_sha256"
TAG_IDENTITY_NET = "identity_net_sha256"
TAG_GIT_COMMIT = "git_commit"
# Evaluation: run tags, and the tags it leaves on the model versions it scored or promoted.
TAG_PROTOCOL = "ipsr.protocol"
TAG_MODEL = "ipsr.model.{label}"  # the spec (models:/name/version or a path) behind a table row
TAG_PROMOTION_DECISION = "ipsr.promotion"  # JSON: scores, evidence, verdict
TAG_PROMOTION = "promotion"  # on the candidate version: "promoted: …" / "not promoted: …"
TAG_PROMOTION_RUN = "promotion_eval_run_id"
TAG_EVAL_MEAN_RANK1 = "eval.{protocol}.{recognizer}.mean_rank1"
TAG_EVAL_RUN = "eval.{protocol}.run_id"
METRIC_RANK1 = "rank1/{recognizer}/{method}/{column}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, or the embedded SQLite store under ``$IPSR_HOME`` (created on first use)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri!r} is a file store, which MLflow 3 no longer supports; "
                "use sqlite:///path/mlflow.db or an http(s):// tracking server (or unset it for the embedded default)"
            )
        return uri
    mlflow_db().parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlflow_db().resolve()}"


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments: ``$IPSR_HOME/mlartifacts`` for the embedded store, else the
    server's default (None)."""
    if not is_embedded(uri):
        return None
    root = mlflow_artifacts()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve().as_uri()


def client(uri: str | None = None):
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment ``name``, created (with the embedded artifact root) when missing."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    c = client(uri)
    try:  # the first call a job makes: say clearly when the server is unreachable or refuses us
        experiment = c.get_experiment_by_name(name)
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: {_explain(err)}") from None
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted; restore it or pick another --experiment")
        return experiment.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # noqa: BLE001 - a concurrent creator won the race
        experiment = c.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _explain(err: Exception) -> str:
    text = first_line(err)
    if "401" in text or "403" in text:
        return (
            f"{text} — set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or "
            "MLFLOW_TRACKING_TOKEN for this server"
        )
    return text


def create_run(experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str], uri: str) -> str:
    """A new RUNNING run with ``params`` logged; returns its id."""
    from mlflow.entities import Param

    c = client(uri)
    run = c.create_run(experiment_id, run_name=run_name, tags={TAG_RUN_NAME: run_name, **tags})
    flat = [Param(k, _param_value(v)) for k, v in sorted(flatten(params).items())]
    for start in range(0, len(flat), 100):  # log_batch accepts at most 100 params per call
        c.log_batch(run.info.run_id, params=flat[start : start + 100])
    return run.info.run_id


def set_run_status(run_id: str, status: str, uri: str) -> None:
    """``FINISHED`` | ``FAILED`` | ``KILLED``."""
    client(uri).set_terminated(run_id, status=status)


def run_exists(run_id: str, uri: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client(uri).get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def register(
    model_uri: str,
    name: str,
    *,
    alias: str | None = CANDIDATE,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``name``, tag it and point ``alias`` at it; returns the version."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_registry_uri(uri)
    version = mlflow.register_model(model_uri, name).version
    tag_version(name, version, tags or {}, uri)
    if alias:
        set_alias(name, alias, version, uri)
    return str(version)


def tag_version(name: str, version: str, tags: dict[str, str], uri: str | None = None) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))


def set_alias(name: str, alias: str, version: str, uri: str | None = None) -> None:
    client(uri).set_registered_model_alias(name, alias, version)


def version_or_none(name: str, alias: str, uri: str | None = None):
    """The ``ModelVersion`` behind ``name@alias``, None when the model or alias does not exist; any other registry
    error (unreachable server, refused credentials) is a UserError: "unknown" must never read as "none"."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as err:
        missing = err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)
        )
        if missing:
            return None
        raise UserError(
            f"cannot read {name}@{alias} from the registry at {uri or tracking_uri()}: {first_line(err)}"
        ) from None


def version_for_alias(name: str, alias: str, uri: str | None = None):
    """The ``ModelVersion`` behind ``name@alias``; UserError when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        raise UserError(f"no registered model version {name}@{alias} in {uri or tracking_uri()}") from None


@functools.cache
def git_commit() -> str:
    """The code's commit (with ``-dirty`` when it has uncommitted changes), or ``unknown``.

    ``$IPSR_GIT_COMMIT`` wins: ``ipsr submit`` sets it from the submitting checkout (the job's working dir ships
    without ``.git``) and the container image bakes it in at build time (infra/docker/Dockerfile)."""
    if os.environ.get("IPSR_GIT_COMMIT"):
        return os.environ["IPSR_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    git = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10, check=True)
    try:
        sha = git(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
