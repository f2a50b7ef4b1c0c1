"""One configuration for the platform: a sectioned YAML file < IPSR_* environment < flags; `ipsr config show`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ipsr_model.errors import UserError
from ipsr_platform.config import (
    EvaluateConfig,
    IdentifyConfig,
    PreprocessConfig,
    ServeConfig,
    TrainConfig,
    build_config,
)

IPSR = str(Path(sys.executable).with_name("ipsr"))

PLATFORM_FILE = """
platform:
  mlflow_tracking_uri: http://127.0.0.1:5999
  s3_endpoint_url: http://127.0.0.1:9000
preprocess:
  input: /data/faces
  output: /data/aligned
  margin: 8
train:
  data: /data/aligned
  run_name: r1
  epochs: 3
"""


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "IPSR_CONFIG_YAML"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(("IPSR_TRAIN_", "IPSR_PREPROCESS_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_each_job_reads_its_section_with_yaml_env_flag_precedence(tmp_path, clean_env):
    path = tmp_path / "ipsr.yaml"
    path.write_text(PLATFORM_FILE)
    clean_env.setenv("IPSR_TRAIN_EPOCHS", "5")
    train = build_config(TrainConfig, env_prefix="IPSR_TRAIN_", yaml_file=path, batch_size=8)
    assert (train.data, train.run_name, train.epochs, train.batch_size) == ("/data/aligned", "r1", 5, 8)
    assert build_config(TrainConfig, env_prefix="IPSR_TRAIN_", yaml_file=path, epochs=7).epochs == 7
    pre = build_config(PreprocessConfig, env_prefix="IPSR_PREPROCESS_", yaml_file=path)
    assert (pre.input, pre.margin) == ("/data/faces", 8)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"  # platform section → its env var
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_environment_wins_over_the_platform_section(tmp_path, clean_env):
    path = tmp_path / "ipsr.yaml"
    path.write_text(PLATFORM_FILE)
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/mine.db")
    build_config(TrainConfig, env_prefix="IPSR_TRAIN_", yaml_file=path)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/mine.db"


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {data: x, run_name: r}\ntrian: {epochs: 2}\n", "unknown sections \\['trian'\\]"),
        ("platform: {mlflow_uri: x}\n", "invalid platform section: mlflow_uri"),
        ("train: [1, 2]\n", "must be a mapping"),
        ("train: {data: x, run_name: r, epochz: 2}\n", "epochz"),
    ],
)
def test_mistakes_in_the_file_are_one_clear_error(tmp_path, clean_env, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        build_config(TrainConfig, env_prefix="IPSR_TRAIN_", yaml_file=path)


@pytest.mark.parametrize(
    "model, required",
    [(EvaluateConfig, {"data": "x"}), (IdentifyConfig, {"probes": "p", "gallery": "g", "out": "o"}), (ServeConfig, {})],
)
def test_every_inference_job_back_projects_three_steps_unless_told(clean_env, model, required):
    """One setting, one default, for each job that restores LR probes (evaluation scores what serving serves)."""
    prefix = f"IPSR_{model.__name__.removesuffix('Config').upper()}_"
    assert build_config(model, env_prefix=prefix, **required).back_projection == 3
    assert build_config(model, env_prefix=prefix, back_projection=0, **required).back_projection == 0
    with pytest.raises(UserError, match="back_projection: Input should be less than or equal to 20"):
        build_config(model, env_prefix=prefix, back_projection=21, **required)


def test_config_show_prints_the_effective_values_and_what_is_missing(tmp_path):
    path = tmp_path / "ipsr.yaml"
    path.write_text(PLATFORM_FILE.replace("  input: /data/faces\n", ""))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IPSR_", "MLFLOW_", "RAY_ADDRESS"))}
    env |= {"IPSR_TRAIN_EPOCHS": "5", "IPSR_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [IPSR, "config", "show", "--config", str(path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["platform"]["mlflow_tracking_uri"] == "http://127.0.0.1:5999"
    assert shown["platform"]["home"] == str(tmp_path / "home")
    assert shown["train"]["epochs"] == 5 and shown["train"]["lr"] == 2e-4
    assert shown["preprocess"]["margin"] == 8 and shown["preprocess"]["input"] is None
    assert "# preprocess: not runnable as is — input: Field required" in result.stdout
    assert "# train:" not in result.stdout
