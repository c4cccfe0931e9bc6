"""The ``metagrad`` command as users meet it, in real processes on the tiny dataset: output pipes closed
early, two processes on one run folder, a full file system and a read-only one (made with ``unshare``
where the machine allows it; skipped otherwise). Each process imports torch, so these are slow tests; the
same classes have fast twins in tests/training/test_hostile_use.py and test_runlock.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metagrad import cli
from metagrad.training import setup
from metagrad.training.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent / "training"))
from tiny_run import fake_load_dataset

TINY_CLI = Path(__file__).parent / "training" / "tiny_cli.py"
TINY = ["--ways", "3", "--shots", "1", "--query-shots", "2", "--set", "model.hidden_size=8",
        "--meta-batch-size", "4", "--test-inner-steps", "2", "--eval-every", "2", "--eval-tasks", "4",
        "--test-tasks", "6", "--device", "cpu", "--log-every", "1"]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TINY_CLI.parent), *sys.path]),
            "OMP_NUM_THREADS": "1"}


def _command(*args: str) -> list[str]:
    return [sys.executable, str(TINY_CLI), *args]


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], check=False, capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="no user namespaces here to mount a small "
                                                               "or read-only file system in")


# -------------------------------------------------------------------------------------------- pipes


@pytest.mark.slow  # ~25 s here: three processes importing torch; fast in-process twins in tests/training
def test_closed_output_pipes_never_stop_a_training(tmp_path: Path) -> None:
    # `metagrad train ... | head -1` whose reader has gone before the first line: stdout, stderr or both
    # closed at once (three processes side by side, to keep the test short).
    processes = {}
    for closed in ("stdout", "stderr", "both"):
        run_dir = tmp_path / closed
        process = subprocess.Popen(_command("train", *TINY, "--iterations", "6", "--run-dir", str(run_dir)),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment())
        open_pipe = {"stdout": process.stderr, "stderr": process.stdout, "both": None}[closed]
        for pipe in (process.stdout, process.stderr):
            if pipe is not open_pipe:
                pipe.close()
        processes[closed] = (process, open_pipe)
    for closed, (process, open_pipe) in processes.items():
        kept = open_pipe.read().decode() if open_pipe is not None else ""
        assert process.wait(timeout=120) == 0, (closed, kept)
        run_dir = tmp_path / closed
        assert json.loads((run_dir / "results.json").read_text())["iterations"] == 6
        assert load_checkpoint(run_dir / "latest.pt")["iteration"] == 6
        assert "Traceback" not in kept and "Exception ignored" not in kept
        if closed == "stdout":  # progress went on on stderr, to the end
            assert '"split": "test"' in kept
        if closed == "stderr":  # stdout carries the result only
            assert kept.startswith("test accuracy ") and kept.count("\n") == 1


# ------------------------------------------------------------------------------------- one run, one folder


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    for _ in range(1200):  # the holder needs a few seconds to import torch and start
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"the first process ended ({process.returncode}) before {what}: "
                        f"{process.stderr.read().decode()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_second_process_on_a_run_folder_is_refused_until_the_holder_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(setup, "load_dataset", fake_load_dataset())
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(_command("train", *TINY, "--iterations", "1000000", "--checkpoint-every", "1",
                                       "-q", "--run-dir", str(run_dir)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment())
    try:
        _wait_for(lambda: (run_dir / "latest.pt").exists(), holder, "its first checkpoint")
        for argv in (["train", *TINY, "--iterations", "2", "--run-dir", str(run_dir)],
                     ["train", "--resume", "--run-dir", str(run_dir)],
                     ["eval", str(run_dir), "--checkpoint", "latest"]):
            code = cli.main(argv)
            err = capsys.readouterr().err
            assert code == 1, err
            assert f"{run_dir} is in use by process {holder.pid} (metagrad train)" in err, err
        holder.send_signal(signal.SIGKILL)  # as the OOM killer would: the kernel releases the lock
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert cli.main(["eval", str(run_dir), "--checkpoint", "latest"]) == 0
    assert "test accuracy" in capsys.readouterr().out


# ---------------------------------------------------------------------------- full and read-only disks


def _in_namespace(script: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a shell script as root of a new user and mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], check=False, capture_output=True, text=True,
                          env=_environment(), timeout=timeout)


@pytest.mark.slow
@needs_unshare
def test_a_full_disk_stops_with_one_message_and_the_last_checkpoint_intact(tmp_path: Path) -> None:
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    # 160 KB: room for config.json, the metrics, best.pt and one latest.pt (~55 KB), not for two.
    train = " ".join(_command("train", *TINY, "--iterations", "8", "--checkpoint-every", "2", "-q",
                              "--run-dir", str(disk / "run")))
    done = _in_namespace(f"mount -t tmpfs -o size=160k tmpfs {disk} && {{ {train}; echo rc=$?; }}; "
                         f"cp -a {disk}/run {saved}")
    assert "rc=1" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "No space left on device (the disk is full: free some space)" in line
    assert f"continue with: metagrad train --resume --run-dir {disk / 'run'}" in line
    latest = load_checkpoint(saved / "latest.pt")  # the last good one, its checksum verified
    assert latest is not None and latest["iteration"] in (2, 4, 6)
    assert not list(saved.glob(".*.tmp")) and not list(saved.glob(".*.part"))
    # With space again (a copy on the big disk), the run continues from there to the end.
    done = subprocess.run(_command("train", "--resume", "--run-dir", str(saved), "-q"), check=False,
                          capture_output=True, text=True, env=_environment(), timeout=180)
    assert done.returncode == 0, done.stderr
    assert json.loads((saved / "results.json").read_text())["iterations"] == 8


@pytest.mark.slow
@needs_unshare
def test_a_read_only_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(_command("train", *TINY, "--iterations", "2", "-q", "--run-dir", str(run_dir)),
                          check=False, capture_output=True, text=True, env=_environment(), timeout=180)
    assert done.returncode == 0, done.stderr
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    read_only = f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir}"
    evaluate = " ".join(_command("eval", str(run_dir)))
    resume = " ".join(_command("train", "--resume", "--run-dir", str(run_dir), "-q"))
    done = _in_namespace(f"{read_only} && {evaluate}; echo rc=$?; {resume}; echo rc=$?")
    assert "Traceback" not in done.stderr
    # eval computes the whole evaluation: the number is printed although eval_best.json cannot be written
    assert done.stdout.count("rc=1") == 2 and "test accuracy" in done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("Read-only file system" in line for line in errors)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert torch.load(run_dir / "best.pt", weights_only=True)["iteration"] == 2
