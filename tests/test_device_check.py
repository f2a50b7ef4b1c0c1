"""`bench/device_check.py` in its CPU mode: it runs Ray-free, under 3 minutes, and fails loudly on parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_mode_runs_without_ray_mlflow_or_pydantic(tmp_path, facenet_test_images):
    # The GPU box has none of these: packages that refuse to import stand in for their absence.
    blocked = tmp_path / "blocked"
    for name in ("ray", "mlflow", "pydantic", "fastapi", "typer"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU box')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}
    log = tmp_path / "log"
    with log.open("w") as out:  # a file, not a pipe: a stray grandchild cannot keep the wait from ending
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "device_check.py"),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "out"),
                "--faces",
                str(facenet_test_images),
                "--budget-s",  # every row must run: in a loaded suite the default 150 s left some unrun
                "480",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,  # no wall-clock assertion: a loaded box is slow, not wrong
        )
    assert proc.returncode == 0, log.read_text()[-5000:]
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert report["parity_ok"] is True
    by = {}
    for row in report["rows"]:
        by.setdefault(row["section"], []).append(row)
    assert {r["check"] for r in by["parity"]} == {
        "degradation",
        "unet_forward",
        "step_loss",
        "step_grad_norm",
        "step_loss_bf16",
    }
    timed = [r for r in by["train"] if "img_per_s" in r]
    assert {(r["hr_embeddings"], r["batch"]) for r in timed} >= {("computed", 2), ("precomputed", 4)}
    computed, precomputed = (
        next(r["gflop_per_sample"] for r in timed if r["hr_embeddings"] == k) for k in ("computed", "precomputed")
    )
    assert 2.5 < computed - precomputed < 3.2, "the HR forward through FaceNet is ~2.84 GFLOP a sample"
    assert all(r["img_per_s"] > 0 for r in timed)
    assert all(r["faces_found"] > 0.5 and r["img_per_s"] > 0 for r in by["mtcnn"]), by["mtcnn"]
    assert {(r["gallery"], r["batch"]) for r in by["identify"]} == {
        (10_000, 1),
        (10_000, 8),
        (100_000, 1),
        (100_000, 8),
    }
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in by["identify"])
    assert "## parity" in (tmp_path / "out" / "device_check.md").read_text()


def test_parity_failure_exits_non_zero(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    # A tolerance no real difference can meet (errors are >= 0): the check must say so and exit 1.
    monkeypatch.setattr(device_check, "TOLERANCES", dict.fromkeys(device_check.TOLERANCES, -1.0))
    code = device_check.main(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "0", "--faces", str(tmp_path)])
    assert code == 1
    assert "error: parity failed: degradation, unet_forward" in capsys.readouterr().err
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["parity_ok"] is False
    assert all("skipped" in r for r in report["rows"] if r["section"] in ("train", "identify", "mtcnn"))
