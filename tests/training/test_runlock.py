"""The run-folder lock between real processes: a forked child holds it, this process is refused, and a
``kill -9`` of the child releases it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from metagrad import cli
from metagrad.training.runlock import LOCK_NAME, RunFolderInUse, lock_run_dir


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[int]:
    """A child process holding ``tmp_path / "run"``'s lock as ``metagrad train`` would; its PID."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: take the lock, say so, wait for a signal; never return into pytest
        try:
            os.close(read)
            with lock_run_dir(tmp_path / "run", "train"):
                os.write(write, b"locked")
                signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 6) == b"locked"
        yield pid
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):  # a test killed it already
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path, holder: int) -> None:
    with pytest.raises(RunFolderInUse, match=rf"run is in use by process {holder} \(metagrad train\)"), \
            lock_run_dir(tmp_path / "run", "eval", create=False):
        pytest.fail("locked twice")


def test_train_and_eval_in_a_locked_folder_are_one_message(
    tmp_path: Path, holder: int, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "config.json").write_text("{}")
    for argv in (["train", "--run-dir", str(run_dir), "--device", "cpu"],
                 ["train", "--resume", "--run-dir", str(run_dir)], ["eval", str(run_dir)]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run_dir} is in use by process {holder} (metagrad train)"), err
        assert "Traceback" not in err
    assert (run_dir / "config.json").read_text() == "{}"


def test_kill_9_of_the_holder_releases_the_lock(tmp_path: Path, holder: int) -> None:
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    assert (tmp_path / "run" / LOCK_NAME).exists()  # left behind by the killed process: harmless
    with lock_run_dir(tmp_path / "run", "train"):
        assert (tmp_path / "run" / LOCK_NAME).read_text() == f"{os.getpid()} train\n"
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_folder_created_for_nothing_is_removed_again(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), lock_run_dir(tmp_path / "a" / "run", "train"):
        raise RuntimeError("the data could not be loaded")
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with lock_run_dir(tmp_path / "kept", "train"):
        (tmp_path / "kept" / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.json"]
