"""What a person sees: ipsr's own progress bars and tables. Ray's, MLflow's and the libraries' detail goes to one log
file per command (its path printed once); ``--verbose`` shows it live instead.

``quiet(job, home)`` wraps a command from before Ray starts (it sets the environment Ray Data reads) to its end;
library callers and tests that never enter it keep every library's default output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_log_file: Path | None = None
_out = _err = None  # the terminal, once `quiet` has pointed the process's own stdout/stderr at the log file
_announced = False
_last_log: Path | None = None  # the latest log file, for an error message after `quiet` has ended
_closing: list[Callable[[], object]] = []  # run at the end of `quiet`, while its output still goes to the log


def log_file() -> Path | None:
    """The log file in use, else the latest one (for an error message printed after ``quiet`` ended)."""
    return _log_file or _last_log


def out():
    """Where ipsr's own output goes: the terminal's stdout (``sys.stdout`` unless ``quiet``)."""
    return _out or sys.stdout


def err():
    return _err or sys.stderr


def say(text: str, *, error: bool = False) -> None:
    print(text, file=err() if error else out(), flush=True)


@contextlib.contextmanager
def quiet(job: str, logs: Path, enabled: bool = True) -> Iterator[Path | None]:
    """While inside: everything this process and its children write to stdout/stderr — Ray's and MLflow's prints,
    logging handlers, warnings, C++ logs on file descriptors 1 and 2 — goes to ``logs/<job>-<time>.log``;
    ipsr writes its own output to ``out()``/``err()``, which keep the terminal. On exit everything is put back (an
    in-process caller, a test, gets its streams again). Yields the log's path (``announce`` prints it)."""
    global _log_file, _out, _err, _last_log, _announced
    if not enabled or _log_file is not None:
        yield _log_file
        return
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = os.dup(1), os.dup(2)
    _out, _err = (os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace") for fd in (1, 2))
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    env = {name: os.environ.get(name) for name in ("RAY_DATA_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    os.environ.update(RAY_DATA_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")  # ipsr draws its own
    _log_file = _last_log = path
    _announced = False
    try:
        yield path
    finally:
        try:
            _close()
        finally:  # a second Ctrl-C during teardown still gives the terminal back
            _closing.clear()
            log.flush()
            for fd, terminal in zip((1, 2), saved):
                os.dup2(terminal, fd)
                os.close(terminal)
            sys.stdout, sys.stderr = streams
            _out.close()
            _err.close()
            _log_file = _out = _err = None
            for name, value in env.items():
                os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def _close() -> None:
    """Run the ``before_close`` callbacks, latest first; one that fails is noted in the log and does not mask the
    command's own outcome or stop the others."""
    while _closing:
        callback = _closing.pop()
        try:
            callback()
        except Exception as err:
            print(f"ipsr: teardown {getattr(callback, '__qualname__', callback)} failed: {err!r}", flush=True)


def before_close(callback: Callable[[], object]) -> bool:
    """Run ``callback`` when ``quiet`` ends, before the terminal is given back (Ray started under it shuts down
    there: its teardown messages belong in the log, not after the command's table). False outside ``quiet``."""
    if _log_file is None:
        return False
    _closing.append(callback)
    return True


def announce() -> None:
    """Print the log file's path, once per process, when there is one: called where detail starts to flow (Ray
    starting) rather than at ``quiet``, so that a flag mistake stays a one-line error."""
    global _announced
    if _log_file is not None and not _announced:
        _announced = True
        say(f"logs: {_log_file} (--verbose shows them live)", error=True)


def summary(title: str, rows: list[tuple[str, object]], *, error: bool = False) -> None:
    """A job's closing table (key | value) on stdout, or stderr with ``error`` (where preprocess prints it)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, str(value))
    Console(file=err() if error else out()).print(table)


@contextlib.contextmanager
def progress(description: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    """One rich progress bar with counts and rate; yields ``advance(n)``. Verbose: no bar (the libraries' own
    progress output is live then), ``advance`` does nothing."""
    if _log_file is None:  # no ``quiet``, or --verbose
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rate = TextColumn("{task.fields[rate]}")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        rate,
        TimeElapsedColumn(),
        console=Console(file=err()),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, rate="")
        began = time.monotonic()

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=f"{done / max(time.monotonic() - began, 1e-9):.1f} {unit}/s")

        yield advance
