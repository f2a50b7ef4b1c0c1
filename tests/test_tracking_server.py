"""A real `mlflow server` process on 127.0.0.1 with basic auth and S3 artifacts (moto): what a cluster uses
instead of the embedded SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import free_port, stop_process_group

from ipsr_model.errors import UserError

VENV_BIN = Path(sys.executable).parent
ADMIN, PASSWORD = "admin", "ipsr-test-password-1"
BUCKET = "ipsr-mlflow"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, moto_server):
    import boto3

    home = tmp_path_factory.mktemp("mlflow-server")
    auth_ini = home / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{home / 'auth.db'}\nadmin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    s3_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)  # fmt: skip
    port = free_port()
    env = {
        **os.environ,
        **s3_env,
        "MLFLOW_S3_ENDPOINT_URL": moto_server,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "ipsr-test-csrf-key",
    }  # basic-auth needs a fixed CSRF key
    cmd = [
        str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", f"s3://{BUCKET}/ipsr",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering (even 401) means up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (home / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {log}") from None
                time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc, grace_s=20)
        log.close()


def test_without_credentials_the_job_gets_one_clear_error(mlflow_server, monkeypatch):
    from ipsr_platform import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with pytest.raises(UserError, match="401.*MLFLOW_TRACKING_USERNAME"):
        tracking.ensure_experiment("ipsr-server-test")


def test_runs_models_and_registry_go_through_the_server_to_s3(mlflow_server, s3, monkeypatch):
    import mlflow
    from mlflow.models import infer_signature

    from ipsr_model.unet import UNetGenerator
    from ipsr_platform import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    uri = tracking.tracking_uri()
    assert uri == mlflow_server and not tracking.is_embedded(uri)

    experiment_id = tracking.ensure_experiment("ipsr-server-test", uri)
    run_id = tracking.create_run(experiment_id, "server-run", {"beta": 5.0, "model": {"width": 4}}, {}, uri)
    tracking.client(uri).log_metric(run_id, "loss/total", 0.5, step=1)

    torch.manual_seed(0)
    generator = UNetGenerator(4).eval()
    example = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        expected = generator(example)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator, name="generator", serialization_format="pt2", input_example=example.numpy(),
            signature=infer_signature(example.numpy(), expected.numpy()),
        )  # fmt: skip
    version = tracking.register(info.model_uri, "ipsr-unet-server-test", alias=tracking.CANDIDATE, uri=uri)
    assert tracking.version_for_alias("ipsr-unet-server-test", tracking.CANDIDATE, uri).version == version

    loaded = mlflow.pytorch.load_model("models:/ipsr-unet-server-test@candidate")
    with torch.no_grad():
        torch.testing.assert_close(loaded(example), expected)

    run = tracking.client(uri).get_run(run_id)
    assert run.data.params["model.width"] == "4" and run.data.metrics["loss/total"] == 0.5
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ipsr/").get("Contents", [])]
    assert any(k.endswith("MLmodel") for k in keys), keys  # the artifacts live in S3, behind the server
