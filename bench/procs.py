"""This machine's Ray worker processes, found by the title Ray gives each one (``ray::<actor>.<method>``, e.g.
``ray::MapWorker(MapBatches(Aligner)).submit`` or ``ray::ServeReplica:<app>:…``): what the chaos benches kill
and measure, from outside Ray, as a crash or the OOM killer would."""

from __future__ import annotations

import os


def titled(fragment: str) -> dict[int, str]:
    """pid → process title, for the processes whose title contains ``fragment``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").replace("\0", " ").strip()
        except OSError:  # gone while listing
            continue
        if fragment in title:
            found[int(pid)] = title
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
