"""`ipsr quickstart`: the whole platform once, on the embedded default (local Ray, SQLite MLflow, local files).

preprocess (MTCNN on Ray Data) → train a small U-Net for a few minutes (Ray Train) → evaluate against bicubic on
the held-out *test* identities (every face but each identity's first is a probe; both recognizers, intervals, paired
tests, table + CMC + labelled sample grids) → register, and promote in MLflow only if the model beats bicubic
significantly → start Ray Serve, enrol the test identities' first faces, identify their second faces sent as real
16×12 crops → say where everything is.

Models go to their own registry name (`ipsr-quickstart`), so a quickstart never moves a real `ipsr-unet@champion`.
A rerun reuses the aligned dataset (the preprocess output is committed once per data folder and limit).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from ipsr_model.errors import UserError
from ipsr_model.paths import datasets_dir, quickstart_dir
from ipsr_platform import cluster, datasets, tracking
from ipsr_platform import console as terminal
from ipsr_platform.config import EvaluateConfig, PreprocessConfig, ServeConfig, TrainConfig
from ipsr_platform.faces import decode_face, encode_png

if TYPE_CHECKING:
    from jobs.evaluate import Promotion

REGISTERED_NAME = "ipsr-quickstart"
EXPERIMENT = "ipsr-quickstart"
GALLERY = "quickstart"
PROBE_SIZE = (16, 12)  # H×W: a surveillance-sized crop, well below what FaceNet needs
SPLIT = {"val": 0.2, "test": 0.2}
SIZES = ("11x8", "16x12", "16x16")  # where a model can beat bicubic; 21x15 and up are near HR for both
HTTP_TIMEOUT_S = 120


def run_quickstart(
    *,
    data: Path | None,
    output: Path | None,
    limit: int,
    max_steps: int,
    base_channels: int,
    batch_size: int,
    identity_weights: str,
    serve: bool,
    keep_serving: bool,
    port: int,
) -> None:
    console = Console(file=terminal.out())
    timings: dict[str, float] = {}
    out = (output or quickstart_dir()).expanduser().resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")

    def stage(name: str, text: str) -> float:
        console.rule(f"[bold]{name}[/] — {text}")
        return time.perf_counter()

    data = _data(console, data)
    # Ray's detail would drown the five stages: it goes to the log file `ipsr quickstart` prints (unless --verbose).
    cluster.connect()

    subset = f"at most the first {limit} images of " if limit else ""
    t = stage("1/5 preprocess", f"MTCNN alignment of {subset}{data} on Ray Data")
    aligned = _preprocess(console, data, limit, out)
    timings["preprocess"] = time.perf_counter() - t

    t = stage("2/5 train", f"U-Net width {base_channels}, {max_steps} steps on Ray Train (CPU)")
    version = _train(aligned, out, f"quickstart-{stamp}", max_steps, base_channels, batch_size, identity_weights)
    timings["train"] = time.perf_counter() - t
    console.print(f"registered {REGISTERED_NAME} version {version} @candidate")

    t = stage(
        "3/5 evaluate",
        "rank-1 on the unseen test identities (every face but the first a probe): HR, bicubic, the new model",
    )
    from jobs.evaluate import run_and_report

    evaluation = run_and_report(EvaluateConfig(  # promotes the new version if it beats bicubic and @champion
        data=str(aligned), protocol="folder", split="test", sizes=SIZES, identity_weights=identity_weights,
        promote=True, register_as=REGISTERED_NAME, experiment=EXPERIMENT, output=str(out / f"evaluation-{stamp}"),
    ))  # fmt: skip
    timings["evaluate"] = time.perf_counter() - t
    assert evaluation.promotion is not None  # promote=True
    served = _verdict(console, evaluation.promotion)

    if serve:
        t = stage("4/5 serve", f"Ray Serve: enrol the test identities, identify {PROBE_SIZE[0]}x{PROBE_SIZE[1]} probes")
        _serve_demo(aligned, out, stamp, identity_weights, port, keep_serving, console, served)
        timings["serve"] = time.perf_counter() - t

    stage("5/5 done", f"{sum(timings.values()):.0f} s")
    _where_to_look(console, out, evaluation.output)


def _preprocess(console: Console, data: Path, limit: int, out: Path) -> Path:
    """The aligned dataset of ``data`` (its first ``limit`` images), made once per data folder and limit."""
    from jobs.preprocess import run as preprocess

    key = hashlib.sha256(f"{data}|{limit or None}".encode()).hexdigest()[:10]
    aligned = out / "aligned" / f"{data.name}-{key}"
    manifest = preprocess(PreprocessConfig(input=str(data), output=str(aligned), limit=limit or None, split=SPLIT))
    splits = manifest["counts"]["splits"]
    console.print(f"aligned dataset: {aligned} (train {splits.get('train', 0)}, val {splits.get('val', 0)}, "
                  f"test {splits.get('test', 0)} faces)", soft_wrap=True)  # fmt: skip
    return aligned


def _train(
    aligned: Path, out: Path, run_name: str, max_steps: int, base_channels: int, batch_size: int, weights: str
) -> str:
    """Train on one CPU worker and register the result @candidate; returns its version. The default loss is
    pixel-only, whose steps are cheap; the per-epoch validation (small epochs here) is kept to one size so that it
    does not cost as much as the training."""
    from jobs.train import train

    return train(TrainConfig(
        data=str(aligned), run_name=run_name, max_steps=max_steps, batch_size=batch_size,
        base_channels=base_channels, num_workers=1, identity_weights=weights,
        storage=str(out / "runs"), experiment=EXPERIMENT, register_as=REGISTERED_NAME,
        checkpoint_every=max_steps, log_every=max(1, max_steps // 10), val_sizes=("16x12",),
    )).model_version  # fmt: skip


def _data(console: Console, data: Path | None) -> Path:
    """The identity folders to run on: ``--data``, or LFW downloaded once."""
    if data is None:
        console.print(
            "no --data given: downloading LFW (13,233 faces, 173 MB, sha256-checked) into "
            f"{datasets_dir()}; pass --data DIR to use your own identity folders"
        )
        data = datasets.lfw()
    data = data.expanduser().resolve()
    if not data.is_dir():
        raise UserError(f"--data {data}: no such directory (expected identity folders DIR/<identity>/<image>)")
    return data


def _verdict(console: Console, promotion: Promotion) -> str:
    """Say plainly whether the new model beat bicubic; return the alias worth serving (champion when there is
    one, else the candidate, with a warning that it is no better than bicubic). The reason, with its numbers, is
    the evaluation's "promoted: …" line just above."""
    if promotion.promoted:
        console.print(f"[bold green]the new model beats bicubic[/] and is now {REGISTERED_NAME}@champion")
        return tracking.CHAMPION
    console.print("[bold yellow]the new model was not promoted[/] (why: above)")
    if tracking.version_or_none(REGISTERED_NAME, tracking.CHAMPION) is not None:
        console.print(f"serving the existing {REGISTERED_NAME}@champion instead")
        return tracking.CHAMPION
    console.print(
        f"[bold yellow]warning[/]: no champion exists; serving {REGISTERED_NAME}@candidate for the demo only — it "
        "is not better than plain bicubic upsampling (train longer: --max-steps, or on more faces)"
    )
    return tracking.CANDIDATE


def _test_faces(aligned: Path) -> tuple[list[str], list[bytes], list[bytes]]:
    """(identities, first face PNG, second face PNG) of every test identity with ≥ 2 faces, in natural order."""
    from ipsr_platform.protocols import read_identities

    pairs = {name: faces for name, faces in read_identities(aligned, split="test")[0].items() if len(faces) >= 2}
    if len(pairs) < 2:
        raise UserError(f"{aligned}: the test split has {len(pairs)} identities with 2 faces; use more identities")
    return (
        list(pairs),
        [encode_png(f[0].load()) for f in pairs.values()],
        [encode_png(f[1].load()) for f in pairs.values()],
    )


def _small_crop(png: bytes) -> bytes:
    """What a surveillance camera gives: the face at PROBE_SIZE (PIL bicubic, antialiased), as PNG."""
    from PIL import Image

    return encode_png(decode_face(png).resize((PROBE_SIZE[1], PROBE_SIZE[0]), Image.Resampling.BICUBIC))


def _serve_demo(
    aligned: Path,
    out: Path,
    stamp: str,
    identity_weights: str,
    port: int,
    keep_serving: bool,
    console: Console,
    alias: str,
) -> None:
    import requests

    from serving import app as serving
    from serving.edge import TOKEN_ENV

    names, gallery, probes = _test_faces(aligned)
    token = os.environ.get(TOKEN_ENV) or secrets.token_hex(24)
    os.environ[TOKEN_ENV] = token
    cfg = ServeConfig(
        generator=f"models:/{REGISTERED_NAME}@{alias}",
        port=port,
        identity_weights=identity_weights,
        galleries=str(out / "galleries"),
    )
    url = serving.deploy(cfg, echo=console.print)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        gallery_name = f"{GALLERY}-{stamp}"
        enrol = requests.post(
            f"{url}/v1/galleries/{gallery_name}/enroll", params={"aligned": "true"}, headers=headers,
            files=[("image", (f"{n}.png", png, "image/png")) for n, png in zip(names, gallery)],
            data=[("identity", n) for n in names], timeout=HTTP_TIMEOUT_S,
        )  # fmt: skip
        enrol.raise_for_status()
        answer = requests.post(
            f"{url}/v1/galleries/{gallery_name}/identify", params={"top_k": 1}, headers=headers,
            files=[("image", (f"{n}.png", _small_crop(png), "image/png")) for n, png in zip(names, probes)],
            timeout=HTTP_TIMEOUT_S,
        )  # fmt: skip
        answer.raise_for_status()
        _print_identified(console, names, answer.json())
        if keep_serving:
            console.print(f"serving at {url}/v1 (token in ${TOKEN_ENV}; docs {url}/docs) — Ctrl-C stops")
            serving.wait_until_stopped()
            serving.drain()
    finally:
        serving.undeploy()


def _print_identified(console: Console, names: list[str], answer: dict) -> None:
    """The served model's top-1 for each probe, and its rank-1."""
    table = Table(
        "probe (truth)", "top-1", "score", "",
        title=f"identify: {PROBE_SIZE[0]}x{PROBE_SIZE[1]} probes → SR, back-projected → FaceNet → gallery top-1",
    )  # fmt: skip
    correct = 0
    for name, result in zip(names, answer["results"]):
        top = result["matches"][0]
        correct += top["identity"] == name
        table.add_row(name, top["identity"], f"{top['score']:.3f}", "✓" if top["identity"] == name else "✗")
    console.print(table)
    console.print(f"served model version {answer.get('model', {}).get('version')}: rank-1 "
                  f"{correct / len(names):.3f} over {len(names)} probes")  # fmt: skip


def _where_to_look(console: Console, out: Path, evaluation: str) -> None:
    uri = tracking.tracking_uri()  # the store the jobs above wrote to (the environment has not changed since)
    lines = [
        f"outputs:       {out}",
        f"evaluation:    {evaluation}/table.md, cmc.png",
        f"MLflow:        mlflow ui --backend-store-uri {uri}   (experiment {EXPERIMENT}, model {REGISTERED_NAME})",
        f"checkpoints:   {out / 'runs'}",
        "next:          ipsr train --data <preprocess output> --run-name NAME   (ipsr --help)",
    ]
    console.print("\n".join(lines), soft_wrap=True)  # paths and commands stay copy-pasteable
