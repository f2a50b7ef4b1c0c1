"""`ipsr quickstart` as the README runs it: a real subprocess, the whole platform on the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

IPSR = str(Path(sys.executable).with_name("ipsr"))


def quickstart_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IPSR_", "RAY_ADDRESS"))}
    return env | {"IPSR_HOME": str(home), "RAY_AUTH_MODE": "disabled"}


@pytest.mark.slow
def test_quickstart_end_to_end_on_orl(att_faces, home_with_weights, tmp_path):
    import mlflow

    out = tmp_path / "qs"
    result = subprocess.run(
        [IPSR, "quickstart", "--data", str(att_faces), "--limit", "120", "--output", str(out), "--max-steps", "3",
         "--base-channels", "4", "--batch-size", "8", "--port", str(free_port())],  # 12 people: 2 unseen in test
        capture_output=True, text=True, timeout=1200, env=quickstart_env(home_with_weights),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = result.stdout
    for stage in ("1/5 preprocess", "2/5 train", "3/5 evaluate", "4/5 serve", "5/5 done"):
        assert stage in text, stage
    assert "registered ipsr-quickstart version 1 @candidate" in text
    assert "rank-1 — SFace (independent)" in text and "bicubic" in text and "McNemar" in text
    # A plain verdict either way: promoted only when it beats bicubic; otherwise the candidate is served with a
    # warning (there is no earlier champion in this fresh $IPSR_HOME).
    promoted = "the new model beats bicubic" in text
    verdicts = ("does not beat bicubic", "is not significantly better than bicubic")  # jobs.evaluate's two refusals
    flat = " ".join(text.split())
    assert promoted or ("the new model was not promoted" in flat and any(v in flat for v in verdicts)), text[-3000:]
    assert promoted or "warning: no champion exists; serving ipsr-quickstart@candidate" in flat
    assert "served model version 1: rank-1" in text
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    # ipsr's own output only: Ray's and the libraries' lines are in the one log file it names.
    import re

    everything = result.stdout + result.stderr
    noise = re.compile(r"streaming_executor|logging_progress|graceful_shutdown|core_worker|\(pid=|\bINFO\b|WARNING")
    assert not [line for line in everything.splitlines() if noise.search(line)], everything[-4000:]
    (logs,) = [line.split()[1] for line in everything.splitlines() if line.startswith("logs: ")]
    assert noise.search(Path(logs).read_text())

    (evaluation,) = out.glob("evaluation-*")
    assert (evaluation / "table.md").is_file() and (evaluation / "cmc.png").is_file()
    (aligned,) = (out / "aligned").iterdir()
    assert (aligned / "_SUCCESS").is_file()
    uri = f"sqlite:///{home_with_weights / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # other tests set a global registry URI
    tags = client.get_model_version("ipsr-quickstart", "1").tags
    assert tags["promotion"].startswith("promoted" if promoted else "not promoted")
    aliases = client.get_registered_model("ipsr-quickstart").aliases
    assert ("champion" in aliases) == promoted


def test_quickstart_offline_without_data_names_the_option(tmp_path):
    env = quickstart_env(tmp_path / "home") | {"IPSR_LFW_URL": "http://127.0.0.1:9/lfw.tgz"}
    result = subprocess.run([IPSR, "quickstart"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert "error: cannot download http://127.0.0.1:9/lfw.tgz" in result.stderr and "--data DIR" in result.stderr


def test_quickstart_missing_data_folder_is_one_line(tmp_path):
    result = subprocess.run(
        [IPSR, "quickstart", "--data", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300,
        env=quickstart_env(tmp_path / "home"),
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: --data"), result.stderr
    assert "Traceback" not in result.stderr
