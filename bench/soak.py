"""Soak with chaos (issue #28): `ipsr serve` with 2 replicas under a mixed load while replicas are killed and the
model is hot-swapped; every acknowledged write checked at the end.

    .venv/bin/python bench/soak.py [--minutes 10] [--kill-every 120] [--clients 6] [--out bench/soak]

Load (closed loop, ``--clients`` threads on 127.0.0.1): identify requests of 1-4 low-resolution (16x12) ORL probes,
enrolments of new people with one or two faces and an ``image_id`` each (a third are sent twice, as a client retrying
would), gallery reads, identity deletions. Chaos: a replica ``ray.kill``ed every ``--kill-every`` seconds (the two
in turn) and once, mid-run, the served alias moved to a new model version. Recorded: requests by route and status;
acknowledged (200) enrolments present exactly once afterwards; deleted identities returned by an identify that
started after the delete was answered; p50/p99 per route outside and inside kill windows (a kill until Serve has
two running replicas again); that recovery time; each replica's RSS every 10 s, and its growth from minute 2 of its life
to its last sample (``--kill-every 0``: no kills, the replicas live the whole run). Exit 1 if an invariant broke.
``tests/test_serve.py`` runs the same ``soak`` for ~75 s against its own service.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.procs import rss_bytes, titled  # noqa: E402 - after the path insert

GALLERY = "soak"
TIMEOUT = 120
RSS_EVERY_S = 10


@dataclass
class Record:
    """What the clients saw, appended under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list = field(default_factory=list)  # (route, status, started, ended)
    acked: dict = field(default_factory=dict)  # identity → faces acknowledged
    deleted: dict = field(default_factory=dict)  # identity → when its delete was answered
    maybe_deleted: set = field(default_factory=set)  # a delete cut by a kill or a timeout: done or not, unknown
    matches: list = field(default_factory=list)  # (started, identities returned, model versions)
    kills: list = field(default_factory=list)  # (killed at, running again at)
    swap: dict = field(default_factory=dict)
    rss: dict = field(default_factory=dict)  # replica pid → [(when, RSS bytes)], sampled every RSS_EVERY_S

    def call(self, route: str, status: int, started: float) -> None:
        with self.lock:
            self.calls.append((route, status, started, time.monotonic()))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(base: str, auth: dict, path: str, **kw) -> requests.Response | None:
    try:
        return requests.post(f"{base}{path}", headers=auth, timeout=TIMEOUT, **kw)
    except requests.RequestException:
        return None


def identify(base, auth, rec: Record, probes: list[bytes], rng: random.Random) -> None:
    started = time.monotonic()
    chosen = rng.sample(probes, rng.randint(1, 4))
    r = _post(base, auth, f"/v1/galleries/{GALLERY}/identify", params={"top_k": 3},
              json={"images": [{"name": f"p{i}", "data": _b64(p)} for i, p in enumerate(chosen)]})  # fmt: skip
    rec.call("identify", r.status_code if r is not None else 0, started)
    if r is not None and r.status_code == 200:
        results = r.json()["results"]
        names = {m["identity"] for x in results for m in x.get("matches", [])}
        with rec.lock:
            rec.matches.append((started, names, {x.get("model_version") for x in results}))


def enrol(base, auth, rec: Record, faces: list[bytes], rng: random.Random, person: str) -> None:
    """Enrol ``person`` with 1-2 faces; retry with the same image_ids until answered (at most 5 tries), and a third
    of the time once more after the answer: the gallery must still hold each face once."""
    k = rng.randint(1, 2)
    images = rng.sample(faces, k)
    files = [("image", (f"{person}-{i}.pgm", data)) for i, data in enumerate(images)]
    data = [("identity", person)] * k + [("image_id", f"{person}-{i}") for i in range(k)]
    sends = 2 if rng.random() < 1 / 3 else 1
    for _ in range(5):
        started = time.monotonic()
        r = _post(base, auth, f"/v1/galleries/{GALLERY}/enroll", params={"aligned": "true"}, files=files, data=data)
        rec.call("enroll", r.status_code if r is not None else 0, started)
        if r is not None and r.status_code == 200:
            body = r.json()
            # The answer covers every face of the request: new, or already held from a send that was cut after its
            # write landed (the service resends such a request itself). Either way each must be held exactly once.
            with rec.lock:
                rec.acked[person] = max(rec.acked.get(person, 0), body["enrolled"] + body["already_enrolled"])
            sends -= 1
            if not sends:
                return
        elif r is not None and r.status_code < 500:
            return  # a refusal (4xx): counted by route and status


def delete(base, auth, rec: Record, rng: random.Random) -> None:
    with rec.lock:
        gone = rec.deleted.keys() | rec.maybe_deleted
        candidates = [p for p in rec.acked if p not in gone and not p.startswith("seed")]
    if not candidates:
        return
    person = rng.choice(candidates)
    started = time.monotonic()
    try:
        r = requests.delete(f"{base}/v1/galleries/{GALLERY}/identities/{person}", headers=auth, timeout=TIMEOUT)
    except requests.RequestException:
        r = None
    rec.call("delete", r.status_code if r is not None else 0, started)
    with rec.lock:
        if r is not None and r.status_code == 200:
            rec.deleted[person] = time.monotonic()
        elif r is None or r.status_code >= 500:
            rec.maybe_deleted.add(person)


def read(base, auth, rec: Record) -> None:
    started = time.monotonic()
    try:
        r = requests.get(f"{base}/v1/galleries/{GALLERY}", params={"limit": 10}, headers=auth, timeout=TIMEOUT)
    except requests.RequestException:
        r = None
    rec.call("read", r.status_code if r is not None else 0, started)


def client(base, auth, rec: Record, faces, probes, worker: int, deadline: float) -> None:
    rng, n = random.Random(worker), 0
    while time.monotonic() < deadline:
        op = rng.random()
        if op < 0.55:
            identify(base, auth, rec, probes, rng)
        elif op < 0.80:
            n += 1
            enrol(base, auth, rec, faces, rng, f"w{worker}-{n}")
        elif op < 0.92:
            read(base, auth, rec)
        else:
            delete(base, auth, rec, rng)


# --- chaos ------------------------------------------------------------------------------------------------------


def replicas(app: str, deployment: str) -> list[dict]:
    """The named actors of ``deployment``'s replicas (the model's, not the ingress's: the chaos kills those)."""
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and f"{app}#{deployment}#" in a["name"]]  # fmt: skip


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    state = status.deployments.get(deployment) if status is not None else None
    return state.replica_states.get("RUNNING", 0) if state is not None else 0


def chaos(app: str, deployment: str, rec: Record, began: float, deadline: float, kill_every: float, swap_at: float,
          swap) -> None:  # fmt: skip
    """Kill a replica every ``kill_every`` s (the two in turn; a kill waits while Serve has fewer than two running:
    killing the last one is an outage, not a fault), and once, at ``swap_at``, call ``swap`` (moves the alias).
    Each kill's recovery is watched by its own thread, so the swap and the next kill keep their schedule."""
    import ray

    turn, next_kill, next_rss, watchers = 0, began + kill_every if kill_every > 0 else float("inf"), began, []
    while time.monotonic() < deadline - 5:
        if time.monotonic() >= next_rss:
            next_rss = time.monotonic() + RSS_EVERY_S
            for pid, size in replica_rss(app, deployment).items():
                rec.rss.setdefault(pid, []).append((time.monotonic(), size))
        if not rec.swap and time.monotonic() >= began + swap_at:
            rec.swap = {"at": time.monotonic(), "version": str(swap())}
        due = time.monotonic() >= next_kill
        live = sorted(replicas(app, deployment), key=lambda a: a["name"]) if due else []  # listed only when due
        if due and len(live) == 2 and running_replicas(app, deployment) == 2:
            victim = live[turn % 2]
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
            killed, turn, next_kill = time.monotonic(), turn + 1, time.monotonic() + kill_every
            watcher = threading.Thread(target=lambda k=killed, v=victim["name"]: rec.kills.append(
                (k, recovered(app, deployment, v, k + 300))), daemon=True)  # fmt: skip
            watcher.start()
            watchers.append(watcher)
        time.sleep(0.25)
    for watcher in watchers:
        watcher.join(timeout=300)


def recovered(app: str, deployment: str, victim: str, until: float) -> float:
    """When Serve had two running replicas again, the killed one not among them (bounded by ``until``)."""
    while time.monotonic() < until:
        names = {a["name"] for a in replicas(app, deployment)}
        if victim not in names and len(names) == 2 and running_replicas(app, deployment) == 2:
            break
        time.sleep(0.25)
    return time.monotonic()


def replica_rss(app: str, deployment: str) -> dict[int, int]:
    """pid → RSS bytes of this machine's replica processes of ``deployment`` (their title names it)."""
    sizes = {pid: rss_bytes(pid) for pid in titled(f"ServeReplica:{app}:{deployment}")}
    return {pid: size for pid, size in sizes.items() if size is not None}


# --- the run and its report -------------------------------------------------------------------------------------


def soak(base: str, app: str, deployment: str, token: str, faces: list[bytes], probes: list[bytes], seconds: float,
         kill_every: float, swap_at: float, swap, clients: int = 6) -> dict:  # fmt: skip
    """Seed the gallery, run the load and the chaos for ``seconds``, then check every acknowledged write."""
    auth = {"Authorization": f"Bearer {token}"}
    rec = Record()
    for i in range(3):  # identify needs a gallery with someone in it: the seeds are never deleted
        enrol(base, auth, rec, faces, random.Random(-i), f"seed-{i}")
    rss_start = replica_rss(app, deployment)
    began = time.monotonic()
    deadline = began + seconds
    threads = [threading.Thread(target=client, args=(base, auth, rec, faces, probes, w, deadline), daemon=True)
               for w in range(clients)]  # fmt: skip
    chaos_args = (app, deployment, rec, began, deadline, kill_every, swap_at, swap)
    threads.append(threading.Thread(target=chaos, args=chaos_args, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 5 * TIMEOUT)
    final = requests.get(f"{base}/v1/galleries/{GALLERY}", params={"limit": 10_000}, headers=auth, timeout=TIMEOUT)
    final.raise_for_status()
    return report(rec, {p["identity"]: p["faces"] for p in final.json()["page"]}, began, rss_start,
                  replica_rss(app, deployment))  # fmt: skip


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0}
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1e3, 1),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, 1)}  # fmt: skip


def report(rec: Record, held: dict[str, int], began: float, rss_start: dict, rss_end: dict) -> dict:
    def in_kill_window(t: float) -> bool:
        return any(k <= t <= back for k, back in rec.kills)

    def cut_by_kill(started: float, ended: float) -> bool:  # in flight when a replica died: resent by the ingress
        return any(started <= k <= ended for k, _ in rec.kills)

    statuses = Counter(f"{route} {status}" for route, status, _, _ in rec.calls)
    latency = defaultdict(list)
    for route, status, started, ended in rec.calls:
        if status == 200:
            latency[f"{route} {'inside' if in_kill_window(started) else 'outside'} kills"].append(ended - started)
    live = {p: n for p, n in rec.acked.items() if p not in rec.deleted}  # a maybe-deleted person: all or nothing
    lost = {p: (n, held.get(p, 0)) for p, n in live.items()
            if held.get(p, 0) != n and not (p in rec.maybe_deleted and p not in held)}  # fmt: skip
    returned = [(started - rec.deleted[p], p) for started, names, _ in rec.matches for p in names
                if p in rec.deleted and started > rec.deleted[p]]  # fmt: skip
    swap_at, new = rec.swap.get("at"), rec.swap.get("version")
    old_after = [s - swap_at for s, _, versions in rec.matches if swap_at and s > swap_at and versions - {new}]
    return {
        "seconds": round(time.monotonic() - began),
        "requests": len(rec.calls),
        "by_route_status": dict(sorted(statuses.items())),
        "acknowledged_enrolments": len(rec.acked),
        "acknowledged_faces": sum(rec.acked.values()),
        "lost_or_doubled": lost,
        "deleted": len(rec.deleted),
        "deletes_cut_by_a_fault": len(rec.maybe_deleted),
        "deleted_still_held": sorted(p for p in rec.deleted if p in held),
        "deleted_returned_after_answer": len(returned),
        "deleted_returned_max_lag_s": round(max((lag for lag, _ in returned), default=0.0), 2),
        "responses_500_in_flight_at_a_kill": sum(1 for _, s, t, e in rec.calls if s == 500 and cut_by_kill(t, e)),
        "responses_5xx_not_503": sum(1 for _, s, _, _ in rec.calls if s >= 500 and s != 503),
        # A kill's 503: the request started in a kill window, or was in flight on the killed replica (a delete).
        "responses_503_outside_kills": sum(
            1 for _, s, t, e in rec.calls if s == 503 and not (in_kill_window(t) or cut_by_kill(t, e))
        ),
        "kills": len(rec.kills),
        "recovery_s": [round(back - k, 1) for k, back in rec.kills],
        "swap": {"version": new, "old_version_answers_after_s": round(max(old_after, default=0.0), 1)},
        "latency": {k: _percentiles(v) for k, v in sorted(latency.items())},
        "replica_rss_mib_start": {pid: rss // 2**20 for pid, rss in rss_start.items()},
        "replica_rss_mib_end": {pid: rss // 2**20 for pid, rss in rss_end.items()},
        "replica_rss_growth_pct_minute_2_to_last": rss_growth(rec.rss),
    }


def rss_growth(samples: dict, settle_s: float = 120) -> dict:
    """pid → RSS growth (%) of each replica from ``settle_s`` after it was first seen to its last sample, for the
    replicas seen at least twice that long (a replica killed sooner says nothing about a leak)."""
    growth = {}
    for pid, series in samples.items():
        settled = [(t, size) for t, size in series if t >= series[0][0] + settle_s]
        if settled and settled[-1][0] - series[0][0] >= 2 * settle_s:
            growth[pid] = {"mib": [settled[0][1] // 2**20, settled[-1][1] // 2**20],
                           "over_s": round(settled[-1][0] - settled[0][0]),
                           "pct": round(100 * (settled[-1][1] / settled[0][1] - 1), 1)}  # fmt: skip
    return growth


def broken(result: dict) -> list[str]:
    """The invariants that this run broke (empty: all held)."""
    checks = {
        "acknowledged enrolments lost or doubled": result["lost_or_doubled"],
        "deleted identities still in the gallery": result["deleted_still_held"],
        "deleted identities returned by an identify sent after the delete was answered": result[
            "deleted_returned_after_answer"
        ],
        "responses 5xx other than 503": result["responses_5xx_not_503"],
        "responses 503 outside kill windows": result["responses_503_outside_kills"],
    }
    return [f"{what}: {value}" for what, value in checks.items() if value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "att_faces")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=120.0, help="seconds; 0: no kills (a leak run)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "soak")
    args = parser.parse_args()
    from bench.serve import TOKEN, free_port, load_orl, register, scratch_home

    weights = scratch_home()
    import ray
    import torch
    from ray import serve

    from ipsr_model.unet import UNetGenerator
    from ipsr_platform.config import ServeConfig
    from serving.app import build_app

    torch.manual_seed(0)
    register(UNetGenerator(args.base_channels).eval(), alias="soak")
    gallery, probes = load_orl(args.data)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": TIMEOUT})
    cfg = ServeConfig(identity_weights=weights, generator="models:/ipsr-unet@soak", num_replicas=2,
                      cpus_per_replica=0.5, torch_threads=1, model_poll_s=2.0, gallery_refresh_s=1.0,
                      max_queued_requests=256)  # fmt: skip
    serve.run(build_app(cfg, name="Soak"), name="ipsr-soak", route_prefix="/")
    seconds = args.minutes * 60
    result = soak(f"http://127.0.0.1:{port}", "ipsr-soak", "Soak", TOKEN, list(gallery.values()), probes, seconds,
                  args.kill_every, seconds / 2, lambda: register(UNetGenerator(args.base_channels).eval(), "soak"),
                  args.clients)  # fmt: skip
    serve.shutdown()
    ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    if failures := broken(result):
        sys.exit("soak broke: " + "; ".join(failures))


if __name__ == "__main__":
    main()
