"""The `ipsr` command line as a user runs it: a real subprocess of the installed console script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

IPSR = str(Path(sys.executable).with_name("ipsr"))


def run(*args: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([IPSR, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    commands = (
        "weights",
        "smoke",
        "preprocess",
        "train",
        "evaluate",
        "serve",
        "submit",
        "quickstart",
        "jobs",
        "config",
    )
    for command in commands:
        assert command in result.stdout


def test_importing_the_model_core_does_not_import_ray_or_mlflow():
    code = (
        "import sys, ipsr_model, ipsr_model.identity, ipsr_model.training, ipsr_model.metrics, ipsr_model.images,"
        " ipsr_model.sface, ipsr_model.weights;"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'));"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_data_folder_is_one_clear_line(tmp_path):
    _one_line_error(run("smoke", "--data", str(tmp_path / "nope")), "no such directory")


def test_folder_without_identities_is_one_clear_line(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "1.png").write_bytes(b"")
    _one_line_error(run("smoke", "--data", str(tmp_path)), "identity folders")


def test_unreadable_image_is_one_clear_line(tmp_path):
    for person in ("alice", "bob"):
        (tmp_path / person).mkdir()
        for k in (1, 2):
            (tmp_path / person / f"{k}.jpg").write_text("not an image")
    _one_line_error(run("smoke", "--data", str(tmp_path)), "cannot read image", "1.jpg")


def test_unknown_weight_source_is_one_clear_line():
    _one_line_error(run("weights", "fetch", "--source", "imagenet"), "casia-webface-offline")


@pytest.mark.slow
def test_smoke_run_on_real_faces(att_faces):
    result = run("smoke", "--data", str(att_faces), "--steps", "3", "--base-channels", "4")
    assert result.returncode == 0, result.stderr
    assert "AR-style rank-1" in result.stdout and "bicubic" in result.stdout
    for size in ("32x32", "21x15", "16x16", "16x12", "11x8"):  # config.AR_SIZES, the one AR list
        assert size in result.stdout


@pytest.mark.slow
def test_preprocess_output_is_ipsr_only_with_ray_detail_in_a_log_file(att_faces, tmp_path):
    """By hand, `ipsr preprocess` prints its progress bar, its table and one `logs:` line; Ray's lines (start-up,
    Ray Data's executor and progress logging, worker output) are in that file. `--verbose` shows them live."""
    import re
    import shutil

    src = tmp_path / "src"
    for person in ("s1", "s2"):
        (src / person).mkdir(parents=True)
        for k in (1, 2):
            shutil.copy(att_faces / person / f"{k}.pgm", src / person / f"{k}.pgm")
    env = {"IPSR_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    flags = ["preprocess", "--input", str(src), "--split", "val=0,test=0"]
    # Both at once: each starts its own local Ray, which is mostly waiting.
    loud_proc = subprocess.Popen(
        [IPSR, *flags, "--output", str(tmp_path / "loud"), "--verbose"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    quiet = run(*flags, "--output", str(tmp_path / "quiet"), **env)
    text = quiet.stdout + quiet.stderr
    assert quiet.returncode == 0, text[-3000:]
    ray_lines = re.compile(
        r"streaming_executor|logging_progress|Started a local Ray|\(pid=|INFO|Execution plan|core_worker"
    )
    assert not [line for line in text.splitlines() if ray_lines.search(line)], text
    logs = [line for line in text.splitlines() if line.startswith("logs: ")]
    assert len(logs) == 1, text
    log_file = Path(logs[0].split()[1])
    assert log_file.parent == tmp_path / "home" / "logs" and ray_lines.search(log_file.read_text())
    assert "preprocess" in text and "aligned" in text and "4" in text  # the progress bar and the summary table

    out, err = loud_proc.communicate(timeout=600)
    assert loud_proc.returncode == 0, err[-3000:]
    assert "logs: " not in out + err and ray_lines.search(out + err)


def test_what_a_command_tears_down_at_its_end_goes_to_its_log(tmp_path, capfd):
    """Ray started under `quiet` shuts down inside it (`cluster.connect` registers that): its exit-time lines — a
    gcs_server error printed after the table once failed CI — land in the log, not on the terminal."""
    from ipsr_platform import console

    assert not console.before_close(lambda: print("outside"))  # no `quiet`: nothing registered, nothing run
    with console.quiet("job", tmp_path) as log:
        console.before_close(lambda: print("(pid=gcs_server) teardown", flush=True))
        console.before_close(lambda: 1 / 0)  # a failing teardown neither hides the other nor the command's outcome
    out, err = capfd.readouterr()
    assert "teardown" not in out + err and "outside" not in out + err
    assert "(pid=gcs_server) teardown" in log.read_text() and "ZeroDivisionError" in log.read_text()

    def interrupted():
        raise KeyboardInterrupt  # a second Ctrl-C while Ray shuts down

    with pytest.raises(KeyboardInterrupt):
        with console.quiet("job", tmp_path):
            console.before_close(interrupted)
    print("terminal again")
    assert "terminal again" in capfd.readouterr().out and not console.before_close(print)  # streams given back


def test_first_line_of_an_error_never_fails():
    # Every "one clear line" built from a library's exception goes through it: a multi-line SDK dump keeps its
    # first line, an empty message names the exception's type (an IndexError used to replace the real error).
    from ipsr_model.errors import first_line

    assert first_line(OSError("\n  bucket not found\n  <xml dump>")) == "bucket not found"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("   \n ")) == "ValueError"


def test_a_local_ray_that_missed_its_start_timeout_is_one_clear_line(monkeypatch):
    """Ray gives a local raylet a fixed 30 s to register; an overloaded machine misses it (seen in a full suite).
    Ray's own message and stack become one line that says what happened and what to do; other errors pass."""
    import ray

    from ipsr_model.errors import UserError
    from ipsr_platform import cluster

    def init(**_):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(UserError, match="did not start within Ray's 30 s.*overloaded; run the command again$"):
        cluster.connect()
    monkeypatch.setattr(ray, "init", lambda **_: (_ for _ in ()).throw(ConnectionError("GCS at 10.0.0.1 refused")))
    with pytest.raises(ConnectionError, match="refused"):
        cluster.connect()
