"""Every default location of ipsr, in one torch-free module (the CLI, tracking and the jobs import it for free).

All live under ``$IPSR_HOME`` (default ``~/.cache/ipsr``): the weights cache, the embedded MLflow store, galleries,
training runs, evaluations, downloaded datasets, the quickstart's outputs and the log files.
"""

from __future__ import annotations

import os
from pathlib import Path


def ipsr_home() -> Path:
    """``$IPSR_HOME``, or ``~/.cache/ipsr``."""
    return Path(os.environ.get("IPSR_HOME") or "~/.cache/ipsr").expanduser()


def weights_dir() -> Path:
    return ipsr_home() / "weights"


def galleries_dir() -> Path:
    return ipsr_home() / "galleries"


def runs_dir() -> Path:
    return ipsr_home() / "runs"


def evaluations_dir() -> Path:
    return ipsr_home() / "evaluations"


def datasets_dir() -> Path:
    return ipsr_home() / "datasets"


def quickstart_dir() -> Path:
    return ipsr_home() / "quickstart"


def logs_dir() -> Path:
    return ipsr_home() / "logs"


def mlflow_db() -> Path:
    """The embedded tracking store (SQLite) when no ``$MLFLOW_TRACKING_URI`` is set; artifacts beside it."""
    return ipsr_home() / "mlflow.db"


def mlflow_artifacts() -> Path:
    return ipsr_home() / "mlartifacts"
