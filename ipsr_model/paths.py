"""Every default location of ipsr, in one torch-free module (the CLI, tracking and the jobs import it for free).

All live under ``$IPSR_HOME`` (default ``~/.cache/ipsr``): the weights cache, the embedded MLflow store, galleries,
training runs, evaluations, downloaded datasets, the quickstart's outputs and the log files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def ipsr_home() -> Path:
    """``$IPSR_HOME``, or ``~/.cache/ipsr``."""
    return Path(os.environ.get("IPSR_HOME") or "~/.cache/ipsr").expanduser()


def _under_home(name: str) -> Callable[[], Path]:
    """A location under ``$IPSR_HOME``, resolved at each call (tests and commands change the variable)."""
    return lambda: ipsr_home() / name


weights_dir = _under_home("weights")
galleries_dir = _under_home("galleries")
runs_dir = _under_home("runs")
evaluations_dir = _under_home("evaluations")
datasets_dir = _under_home("datasets")
quickstart_dir = _under_home("quickstart")
logs_dir = _under_home("logs")
mlflow_db = _under_home("mlflow.db")  # the embedded tracking store when no $MLFLOW_TRACKING_URI is set
mlflow_artifacts = _under_home("mlartifacts")
