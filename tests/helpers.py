"""Small helpers for tests that start real servers as subprocesses (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from bench.procs import titled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group started with ``start_new_session=True``, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def ray_worker_pids(title: str) -> list[int]:
    """PIDs of live Ray worker processes whose title (``ray::…``, e.g. ``ray::RayTrainWorker``) contains ``title``."""
    return [pid for pid, name in titled(title).items() if name.startswith("ray::")]
