"""Connecting to Ray: the one place every job (and the server) gets its Ray instance from.

``RAY_ADDRESS`` set (``ray://…``, ``auto`` or a head's GCS address) → join that cluster; unset → start a local
in-process instance on this machine (the embedded default). The dashboard stays on for local instances: Ray
Train V2's controller queries the state API through it, so a process that runs preprocess and then train
(`ipsr quickstart`) must not start Ray without it.
"""

from __future__ import annotations

import logging

LOCAL_START_TIMEOUT = "Ray's local node did not start within Ray's 30 s"


def connect() -> None:
    """Initialise Ray once per process; a no-op when it is already initialised (tests share one instance).

    Worker output reaches the driver (``log_to_driver``) and goes wherever the driver's stdout goes: the terminal,
    or after ``console.quiet`` (the CLI's default) the command's log file, whose path is printed once here.
    """
    import ray

    from ipsr_platform import console

    if ray.is_initialized():
        return
    from ipsr_model.errors import UserError

    try:  # reads RAY_ADDRESS itself: join that cluster, or start a local instance when it is unset
        context = ray.init(log_to_driver=True)
    except Exception as err:  # Ray gives a local raylet a fixed 30 s to register (not configurable)
        if "timed out during startup" not in str(err):
            raise
        raise UserError(f"{LOCAL_START_TIMEOUT}: the machine may be overloaded; run the command again") from None
    logging.getLogger(__name__).info("Ray session: %s", getattr(context, "address_info", {}).get("session_dir"))
    console.before_close(ray.shutdown)  # else Ray's exit-time lines (gcs_server's) reach the terminal
    console.announce()


def actor_pool(device: str, num_actors: int | None) -> tuple[int, dict]:
    """(actors, each one's Ray resources) of a batch-inference job's model stage: one actor per CPU or GPU by
    default; with more actors than GPUs, each one a share of them."""
    import ray

    from ipsr_model.errors import UserError

    resources = ray.cluster_resources()
    if device == "cuda":
        gpus = float(resources.get("GPU", 0))
        if gpus < 1:
            raise UserError("--device cuda, but the Ray cluster has no GPU")
        n = num_actors or int(gpus)
        return n, {"num_gpus": gpus / n if n > gpus else 1, "num_cpus": 1}
    cpus = float(resources.get("CPU", 1))
    n = num_actors or max(1, int(cpus))
    return n, {"num_cpus": min(1.0, cpus / n)}
