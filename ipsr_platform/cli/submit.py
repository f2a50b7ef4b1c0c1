"""`ipsr submit` / `ipsr jobs`: the same job modules on a remote Ray cluster, through the Ray Jobs API.

What travels with a job:
- the entrypoint ``python -m jobs.<job> <job flags>`` (flags only: never a secret);
- ``runtime_env.working_dir``: this source checkout (without venvs, caches, tests, benchmarks, infra), so the
  cluster runs exactly the code you have; an installed ipsr (no checkout) sends none and relies on the image;
- ``runtime_env.env_vars``: the non-secret settings jobs read from the environment (MLflow URI, S3 endpoint and
  region), the ``--config`` YAML text (``IPSR_CONFIG_YAML``) and the checkout's commit (``IPSR_GIT_COMMIT``, with
  ``-dirty`` for uncommitted changes: the job's working dir has no ``.git``). Never a credential by default: Ray
  keeps the runtime env in the job's record, readable by anyone who can list jobs, long after the job ends. The
  cluster has its own credentials (Kubernetes Secrets as env, instance roles / IRSA: infra/README.md);
  ``--forward-env NAME`` sends one variable anyway, with a warning.

Auth: with Ray token authentication on the cluster, the token comes from ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (Ray's own order) and is sent as a bearer header.
"""

from __future__ import annotations

import os
import shlex
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from ray.exceptions import AuthenticationError

from ipsr_model.errors import UserError, first_line

JOBS = ("preprocess", "train", "evaluate", "enrol", "identify")

# Settings, not secrets: forwarded when set.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "IPSR_S3_ENDPOINT_URL",
)
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")
CONFIG_ENV = "IPSR_CONFIG_YAML"
COMMIT_ENV = "IPSR_GIT_COMMIT"

# Never uploaded: they are large, machine-specific or not needed to run a job.
EXCLUDES = [".venv", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info", "tests", "bench", "infra", "*.db",
            "mlruns", "mlartifacts"]  # fmt: skip

# Unreachable address, HTTP errors (Ray raises RuntimeError for them), a missing or refused token.
# requests' ConnectionError is not the builtin one: a dropped connection is an OSError to Python.
API_ERRORS = (ConnectionError, RuntimeError, AuthenticationError, requests.RequestException)
FOLLOW_TIMEOUT_S = float(os.environ.get("IPSR_FOLLOW_TIMEOUT_S", 7 * 24 * 3600))
AGENT_WAIT_S = 60.0  # a fresh cluster's job agent registers seconds after its dashboard answers


def source_checkout() -> Path | None:
    """The repository root when ipsr runs from a source checkout, else None (an installed package)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "jobs").is_dir() else None


def auth_token() -> str | None:
    """The Ray auth token, looked up in Ray's order; None when there is none."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path_env := os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip():
        path = Path(path_env).expanduser()
        if not path.is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_env}: no such file")
        return path.read_text().strip() or None
    default = Path("~/.ray/auth_token").expanduser()
    return default.read_text().strip() or None if default.is_file() else None


def redact(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if any(m in k for m in SECRET_MARKERS) else v) for k, v in env.items()}


def build_submission(
    job: str,
    args: list[str],
    config_file: Path | None,
    forward_env: Sequence[str] = (),
    *,
    commands: Mapping[str, Any],
    warn=print,
) -> dict[str, Any]:
    """Entrypoint + runtime_env for ``job``; the job flags are parsed first by its CLI command (``commands``: the
    CLI's click commands by name) so mistakes fail locally."""
    if job not in JOBS:
        raise UserError(f"unknown job {job!r}; expected one of {', '.join(JOBS)}")
    if "--config" in args:
        raise UserError("pass --config to `ipsr submit` (before the job name), not as a job flag")
    try:
        commands[job].make_context(job, list(args))
    except Exception as err:  # click's usage errors: unknown flag, bad value, missing argument
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise UserError(f"ipsr {job}: {message}") from None

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if urlparse(env.get("MLFLOW_TRACKING_URI", "")).password:
        raise UserError(
            "MLFLOW_TRACKING_URI holds a password, which would be readable in the job's record: give the "
            "cluster MLFLOW_TRACKING_USERNAME/PASSWORD as a Secret (infra/README.md) and drop them from the "
            "URI, or pass --forward-env MLFLOW_TRACKING_URI to send it anyway"
        )
    for name in forward_env:
        if name not in os.environ:
            raise UserError(f"--forward-env {name}: no such environment variable here")
        env[name] = os.environ[name]
        warn(
            f"warning: {name} is forwarded in the job's runtime_env: anyone who can list jobs on this cluster can "
            "read it, for as long as the cluster keeps the job's record"
        )
    from ipsr_platform.tracking import git_commit

    env.setdefault(COMMIT_ENV, git_commit())
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"config file not found: {config_file}")
        env[CONFIG_ENV] = config_file.read_text()
    runtime_env: dict[str, Any] = {"env_vars": env}
    if (checkout := source_checkout()) is not None:
        runtime_env |= {"working_dir": str(checkout), "excludes": EXCLUDES}
    return {"entrypoint": shlex.join(["python", "-m", f"jobs.{job}", *args]), "runtime_env": runtime_env}


def client(address: str):
    """A JobSubmissionClient that sends the auth token; UserError naming the address when it is unreachable
    or refuses us."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r}: expected the dashboard URL, e.g. http://HEAD:8265")
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)  # checks reachability and the token right away
    except API_ERRORS as err:
        raise UserError(f"Ray cluster at {address}: {_explain(err, token)}") from None


def check_access(job_client, address: str) -> None:
    """List jobs once: the cheapest call that needs both reachability and a valid token."""
    try:
        job_client.list_jobs()
    except API_ERRORS as err:
        raise UserError(f"Ray cluster at {address}: {_explain(err, auth_token())}") from None


def submit(address: str, submission: dict[str, Any]) -> str:
    """The job id. It is chosen here and sent with the job, so that when the answer is lost on the way (a busy,
    freshly started dashboard drops the connection) the cluster is asked whether the job is there before sending
    it again: a retry never runs a job twice. A fresh cluster's "No available agent" (nothing was submitted) is
    retried too; both for up to ``AGENT_WAIT_S``."""
    job_client = client(address)
    check_access(job_client, address)
    job_id = f"ipsr_{uuid.uuid4().hex[:16]}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return job_client.submit_job(
                entrypoint=submission["entrypoint"], runtime_env=submission["runtime_env"], submission_id=job_id
            )
        except API_ERRORS as err:
            if _exists(job_client, job_id):
                return job_id
            transient = isinstance(err, requests.ConnectionError) or "No available agent" in str(err)
            if not transient or time.monotonic() > deadline:
                raise UserError(f"submission to {address} failed: {_explain(err, auth_token())}") from None
        time.sleep(1.0)


def _exists(job_client, job_id: str) -> bool:
    try:
        job_client.get_job_info(job_id)
    except API_ERRORS:  # not there, or the cluster did not answer: the caller decides whether to send it again
        return False
    return True


def follow(address: str, job_id: str, echo) -> str:
    """Stream the job's logs until it ends (bounded by IPSR_FOLLOW_TIMEOUT_S); returns the final status."""
    import asyncio

    from ray.job_submission import JobStatus

    job_client = client(address)

    async def tail() -> None:
        async for lines in job_client.tail_job_logs(job_id):
            echo(lines.rstrip("\n"))

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=FOLLOW_TIMEOUT_S))
    except TimeoutError:
        raise UserError(
            f"job {job_id} still running after {FOLLOW_TIMEOUT_S:.0f}s of --follow; it keeps running"
        ) from None
    # The log stream can end a moment before the status is final.
    deadline = time.monotonic() + 60
    while not (status := job_client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    return str(status.value if isinstance(status, JobStatus) else status)


def _explain(err: BaseException, token: str | None) -> str:
    if isinstance(err, AuthenticationError):
        hint = "the token was refused" if token else "no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
        return f"{first_line(err)} ({hint})"
    return first_line(err)
