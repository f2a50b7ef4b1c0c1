"""This machine's Ray worker processes, found by the title Ray gives each one (``ray::<actor>.<method>``, e.g.
``ray::MapWorker(MapBatches(Aligner)).submit`` or ``ray::ServeReplica:<app>:…``): what the chaos benches kill
and measure, from outside Ray, as a crash or the OOM killer would. Only descendants of the calling process count
(a local Ray's raylet and workers are its children): a second Ray on the same machine — another test worker's,
a user's — is never touched."""

from __future__ import annotations

import os


def _parents() -> dict[int, int]:
    """pid → parent pid of every live process."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:  # gone while listing
            continue
        parents[int(pid)] = int(stat.rpartition(")")[2].split()[1])  # the name in (…) may hold spaces
    return parents


def _descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    while pid > 1:
        pid = parents.get(pid, 0)
        if pid == root:
            return True
    return False


def titled(fragment: str) -> dict[int, str]:
    """pid → process title, for this process's descendants whose title contains ``fragment``."""
    root, parents = os.getpid(), _parents()
    found = {}
    for pid in parents:  # the processes _parents just listed
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").replace("\0", " ").strip()
        except OSError:  # gone while listing
            continue
        if fragment in title and _descends(pid, root, parents):
            found[pid] = title
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
