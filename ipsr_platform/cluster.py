"""Connecting to Ray: the one place every job (and the server) gets its Ray instance from.

``RAY_ADDRESS`` set (``ray://…``, ``auto`` or a head's GCS address) → join that cluster; unset → start a local
in-process instance on this machine (the embedded default). The dashboard stays on for local instances: Ray
Train V2's controller queries the state API through it, so a process that runs preprocess and then train
(`ipsr quickstart`) must not start Ray without it.
"""

from __future__ import annotations


def connect(*, log_to_driver: bool = True) -> None:
    """Initialise Ray once per process; a no-op when it is already initialised (tests share one instance).

    ``log_to_driver=False`` keeps worker output out of the terminal (it stays in the session's log folder).
    """
    import ray

    if ray.is_initialized():
        return
    # reads RAY_ADDRESS itself: join that cluster, or start a local instance when it is unset
    ray.init(log_to_driver=log_to_driver)
