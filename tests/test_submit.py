"""`ipsr submit` / `ipsr jobs` against a real `ray start --head` cluster with token authentication on 127.0.0.1.

The cluster is a second Ray instance next to the session's in-process one, so every port it opens is chosen
free and it gets its own temp dir; it is stopped by signalling its process group (never `ray stop`, which
would also kill the shared test instance).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, stop_process_group

VENV_BIN = Path(sys.executable).parent
IPSR = str(VENV_BIN / "ipsr")
TOKEN = "ipsr-test-token-0123456789abcdef"
DASHBOARD_WAIT_S = 240


def wait_for_cluster(log: Path, url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    """Until `ray start` says the node is up (its raylet registered: the dashboard answers earlier) and ``url``
    answers; TimeoutError when `ray start` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TimeoutError(f"`ray start` exited ({proc.returncode}) before the cluster was up")
        if "Ray runtime started." in log.read_text():
            try:
                urllib.request.urlopen(url, timeout=2)
                return
            except urllib.error.HTTPError:  # 401 without a token: the server is up
                return
            except OSError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"the cluster was not up after {timeout_s}s")


def start_token_cluster(temp_dir: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head` with token auth, every port chosen free; (its process, the dashboard URL) once the node
    is up and the dashboard answers. TimeoutError with Ray's non-INFO output when that takes over DASHBOARD_WAIT_S
    or `ray start` exits first."""
    dashboard = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run `python -m jobs.<name>`
        # On a starved 2-core box a late heartbeat must not get the node declared dead (`--block` then ends it all),
        # and the dashboard's nine module processes can take over Ray's 60 s to come up: `ray start` then exits 1
        # printing dashboard.log's tail, before the raylet starts (two full suites failed so).
        "RAY_health_check_failure_threshold": "30",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(DASHBOARD_WAIT_S - 30),
    }
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--temp-dir={temp_dir}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]  # fmt: skip
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_cluster(log_path, f"{url}/api/version", DASHBOARD_WAIT_S, proc)
    except TimeoutError as err:
        stop_process_group(proc)
        said = "\n".join(line for line in log_path.read_text().splitlines() if " INFO " not in line)  # not chatter
        raise TimeoutError(f"{err}; ray start said: {said[-3000:]}") from None
    return proc, url


_CLUSTER: list[tuple[subprocess.Popen, Path]] = []  # the running token cluster's `ray start --block`, its log


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A second cluster beside the session's Ray. Its start can fail on a loaded 2-core box for reasons outside the
    code under test — Ray's fixed 30 s for the raylet to register (a full suite lost it so), a free port taken by the
    other worker's Ray before this one binds it — so up to three tries, each on new ports. Ray's logs are kept in
    pytest's temp folder (``token-cluster-logs*``)."""
    temp_dir = ""
    try:
        for attempt in (1, 2, 3):
            temp_dir = tempfile.mkdtemp(prefix="ipsr-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
            try:
                proc, url = start_token_cluster(temp_dir)
                break
            except TimeoutError as err:
                if attempt == 3:
                    raise
                print(f"token cluster did not start (try {attempt}), trying again on new ports: {err}")
                shutil.rmtree(temp_dir, ignore_errors=True)
        _CLUSTER[:] = [(proc, Path(temp_dir) / "ray-start.log")]
        try:
            yield url
        finally:
            _CLUSTER.clear()
            stop_process_group(proc)
    finally:
        logs = Path(temp_dir) / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, tmp_path_factory.mktemp("token-cluster-logs"), dirs_exist_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def cluster_still_up():
    """Names the cause when a test fails because the cluster died under it (not a bare "connection refused")."""
    yield
    if _CLUSTER and _CLUSTER[0][0].poll() is not None:
        proc, log = _CLUSTER[0]
        pytest.fail(f"the token cluster's `ray start --block` exited ({proc.returncode}): {log.read_text()[-1500:]}")


def run_ipsr(*args: str, token: str | None, home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token of the developer's
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([IPSR, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def small_faces(att_faces, tmp_path) -> Path:
    src = tmp_path / "src"
    for person in ("s1", "s2"):
        (src / person).mkdir(parents=True)
        for k in (1, 2):
            shutil.copy(att_faces / person / f"{k}.pgm", src / person / f"{k}.pgm")
    return src


def test_unauthenticated_requests_are_refused(token_cluster, small_faces, tmp_path):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="(?i)401|unauthori|authenticat"):
        JobSubmissionClient(token_cluster).submit_job(entrypoint="echo hi")

    result = run_ipsr(
        "submit", "preprocess", "--address", token_cluster, "--input", str(small_faces),
        "--output", str(tmp_path / "out"), token=None, home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and token_cluster in lines[0], result.stderr

    wrong = run_ipsr("jobs", "list", "--address", token_cluster, token="not-the-token", home=tmp_path)
    assert wrong.returncode == 2 and "error: " in wrong.stderr and "Traceback" not in wrong.stderr, wrong


def test_dry_run_shows_the_job_without_secrets_and_checks_access(token_cluster, small_faces, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    result = run_ipsr(
        "submit", "preprocess", "--address", token_cluster, "--dry-run", "--input", str(small_faces),
        "--output", str(tmp_path / "out"), token=TOKEN, home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"python -m jobs.preprocess --input {small_faces}" in result.stdout
    assert "AWS_SECRET_ACCESS_KEY" not in result.stdout and "very-secret-value" not in result.stdout
    assert '"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"' in result.stdout
    assert '"IPSR_GIT_COMMIT": "' in result.stdout
    assert "reachable and authorised" in result.stdout
    assert not (tmp_path / "out").exists()

    # Forwarding a secret is possible, on purpose only, and says what it costs; the dry run still redacts it.
    forwarded = run_ipsr(
        "submit", "preprocess", "--address", token_cluster, "--dry-run", "--forward-env", "AWS_SECRET_ACCESS_KEY",
        "--input", str(small_faces), "--output", str(tmp_path / "out"), token=TOKEN, home=tmp_path,
    )  # fmt: skip
    assert forwarded.returncode == 0, forwarded.stderr
    assert '"AWS_SECRET_ACCESS_KEY": "***"' in forwarded.stdout and "very-secret-value" not in forwarded.stdout
    assert "warning: AWS_SECRET_ACCESS_KEY is forwarded" in forwarded.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pw-in-uri@127.0.0.1:5000")
    leaky = run_ipsr(
        "submit",
        "preprocess",
        "--address",
        token_cluster,
        "--dry-run",
        "--input",
        str(small_faces),
        "--output",
        str(tmp_path / "out"),
        token=TOKEN,
        home=tmp_path,
    )
    assert leaky.returncode == 2 and leaky.stderr.startswith("error: MLFLOW_TRACKING_URI holds a password"), leaky


@pytest.mark.slow
def test_submitted_job_runs_to_completion_with_the_token(token_cluster, small_faces, tmp_path, monkeypatch):
    import json

    from ray.job_submission import JobSubmissionClient

    from ipsr_platform.tracking import git_commit

    secrets = {
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value-42",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-value-42",
        "AWS_SESSION_TOKEN": "session-token-value-42",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)

    out = tmp_path / "aligned"
    config = tmp_path / "preprocess.yaml"
    config.write_text("margin: 8\nsplit: val=0.0,test=0.0\n")  # shipped as YAML text, read by the job
    result = run_ipsr(
        "submit", "preprocess", "--address", token_cluster, "--config", str(config), "--follow",
        "--input", str(small_faces), "--output", str(out), "--num-actors", "1", token=TOKEN, home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["seen"] == 4 and manifest["counts"]["aligned"] == 4
    assert manifest["config"]["margin"] == 8

    job_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("submitted "))
    # Nothing secret in what the cluster keeps about the job (its record, its logs); the commit is there.
    api = JobSubmissionClient(token_cluster, headers={"Authorization": f"Bearer {TOKEN}"})
    record = json.dumps(api.get_job_info(job_id).runtime_env) + api.get_job_logs(job_id)
    assert not [name for name, value in secrets.items() if value in record or name in record], record[:2000]
    assert api.get_job_info(job_id).runtime_env["env_vars"]["IPSR_GIT_COMMIT"] == git_commit()
    listed = run_ipsr("jobs", "list", "--address", token_cluster, token=TOKEN, home=tmp_path)
    assert listed.returncode == 0 and f"{job_id}\tSUCCEEDED" in listed.stdout, listed
    status = run_ipsr("jobs", "status", job_id, "--address", token_cluster, token=TOKEN, home=tmp_path)
    assert status.stdout.strip() == "SUCCEEDED"
    missing = run_ipsr("jobs", "logs", "raysubmit_nope", "--address", token_cluster, token=TOKEN, home=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: job raysubmit_nope"), missing


def test_a_submission_whose_answer_is_lost_runs_once(token_cluster, monkeypatch):
    """The dashboard takes the job and the connection drops before its answer (a busy, fresh cluster did this in
    the suite): `submit` asks whether its job id is there before sending again — one job, not two, and no
    traceback. A forwarding proxy on 127.0.0.1 in front of the real cluster drops the first submission's answer."""
    import http.server
    import threading

    import requests

    from ipsr_platform.cli import submit as jobs_api

    dropped = []

    class Forward(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            r = requests.request(self.command, token_cluster + self.path, headers=headers, data=body, timeout=60)
            if self.command == "POST" and not dropped:
                dropped.append(r.status_code)
                self.close_connection = True  # the job is in; its answer never arrives
                return
            self.send_response(r.status_code)
            for key, value in r.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    marker = f"lost-answer-{time.time_ns()}"
    try:
        job_id = jobs_api.submit(
            f"http://127.0.0.1:{proxy.server_address[1]}", {"entrypoint": f"echo {marker}", "runtime_env": {}}
        )
    finally:
        proxy.shutdown()
    assert dropped == [200]
    listed = jobs_api.client(token_cluster).list_jobs()
    assert [j.submission_id for j in listed if marker in j.entrypoint] == [job_id]
