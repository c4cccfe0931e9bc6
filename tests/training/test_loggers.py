"""TensorBoard and W&B mirror metrics.jsonl: read back with TensorBoard's own reader and from W&B's offline
run files, after a plain run, a crash and resume, and a logger added on resume."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tiny_run import TINY_OVERRIDES, tiny_config

from metagrad.cli import main
from metagrad.errors import ConfigError
from metagrad.training import loggers, loop
from metagrad.training.loggers import scalars, wandb_records
from metagrad.training.loop import run
from metagrad.training.metrics import WALL_CLOCK_COLUMNS, read_metrics

pytest.importorskip("tensorboard", reason="the tensorboard extra (in .[dev]) is not installed")
pytest.importorskip("wandb", reason="the wandb extra (in .[dev]) is not installed")

from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

# 8 iterations, validation every 2, a checkpoint every 3: a crash at 5 leaves rows 4 and 5 - 1 = 4
# written past the checkpoint at 3.
OVERRIDES = {"meta.iterations": 8, "run.checkpoint_every": 3}


class _Crash(Exception):
    """Stands in for a crash between checkpoints."""


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B account, key or setting of the user's: W&B must choose offline mode by itself."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # nothing leaves the machine, even on an error


def _crash_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    real, calls = loop.compute_meta_gradients, {"n": 0}

    def compute(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == iteration:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_meta_gradients", compute)


def _crash_then_resume(run_dir: Path, monkeypatch: pytest.MonkeyPatch, before: str, after: str) -> None:
    with monkeypatch.context() as mp:
        _crash_at(mp, 5)
        with pytest.raises(_Crash):
            run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": before}), quiet=True)
    assert max(r["step"] for r in read_metrics(run_dir)) == 4  # one row past the checkpoint at 3
    run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": after}), resume=True, quiet=True)


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number of metrics.jsonl as ``{tag: [(step, value)]}``."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir):
        for tag, value in scalars(row).items():
            expected.setdefault(tag, []).append((row["step"], value))
    return expected


def _tensorboard(run_dir: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                                size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _tensorboard_scalars(run_dir: Path) -> list[dict[str, list[tuple[int, float]]]]:
    """``{tag: [(step, value)]}`` as TensorBoard's two readers see them: the classic EventAccumulator and
    the one its server uses (``--load_fast=false``), which purge a restarted run's events differently."""
    classic = _tensorboard(run_dir)
    server = plugin_event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                                       size_guidance={"tensors": 0})
    server.Reload()
    return [
        {tag: [(e.step, e.value) for e in classic.Scalars(tag)] for tag in classic.Tags()["scalars"]},
        {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in server.Tensors(tag)]
         for tag in server.PluginTagToContent("scalars")},
    ]


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _assert_tensorboard_mirrors_metrics(run_dir: Path) -> None:
    expected = _expected(run_dir)
    for logged in _tensorboard_scalars(run_dir):
        assert sorted(logged) == sorted(expected)
        for tag, points in expected.items():
            # TensorBoard stores float32; the wall-clock columns of resumed steps are the second run's
            assert logged[tag] == [(step, _float32(value)) for step, value in points], tag


def test_tensorboard_mirrors_metrics_jsonl(tmp_path: Path, fake_data: list) -> None:
    run_dir = tmp_path / "run"
    run(tiny_config(run_dir, **{"run.loggers": "tensorboard", "meta.learned_inner_lr": "per-layer-per-step"}),
        quiet=True)
    _assert_tensorboard_mirrors_metrics(run_dir)
    tags = _tensorboard(run_dir).Tags()["scalars"]
    assert {"train/loss", "train/acc", "train/lr", "train/grad_norm", "train/sec_per_iter",
            "train/peak_mem_mb", "train/train_seconds", "validation/acc", "validation/acc_ci95", "test/acc",
            "test/acc_ci95", "train/inner_lr.0.classifier.weight"} <= set(tags)
    # The resolved config as hyperparameters, the test accuracy as their metric.
    content = _tensorboard(run_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["meta.learned_inner_lr"].string_value == "per-layer-per-step"
    assert hparams["data.ways"].number_value == 3 and hparams["preset"].string_value == "omniglot-maml-5w1s"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert "test/acc" in {m.name.tag for m in experiment.experiment.metric_infos}


@pytest.mark.parametrize("before", ["tensorboard", ""], ids=["logged-throughout", "added-on-resume"])
def test_tensorboard_after_a_resume_has_each_step_once(tmp_path: Path, fake_data: list, before: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    _crash_then_resume(run_dir, monkeypatch, before, "tensorboard")
    for logged in _tensorboard_scalars(run_dir):
        assert [step for step, _ in logged["train/loss"]] == list(range(1, 9))
        assert [step for step, _ in logged["validation/acc"]] == [2, 4, 6, 8]
    _assert_tensorboard_mirrors_metrics(run_dir)
    if before:  # the step written after the checkpoint and dropped is in the event file, purged by the reader
        assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_tensorboard_dropped_for_a_session_then_back(tmp_path: Path, fake_data: list,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # 1: logged up to 4 (checkpoint 3), crash; 2: without TensorBoard, 4-6 (checkpoint 6), crash;
    # 3: TensorBoard again from 6: it drops its 4, is sent 4-6 from metrics.jsonl, then logs 7-8.
    run_dir = tmp_path / "run"
    for names, crash in (("tensorboard", 5), ("", 4)):
        with monkeypatch.context() as mp:
            _crash_at(mp, crash)
            with pytest.raises(_Crash):
                run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": names}), resume=names == "",
                    quiet=True)
    assert json.loads((run_dir / "loggers.json").read_text())["tensorboard"] == {
        "held": 3, "active": False, "log_dir": "tensorboard"}
    run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "tensorboard"}), resume=True, quiet=True)
    _assert_tensorboard_mirrors_metrics(run_dir)


def _wandb_history(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(history rows, config, summary) of an offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    history, config, summary = [], {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return history, config, summary


def test_wandb_offline_without_an_account_and_resumed(tmp_path: Path, fake_data: list, offline_wandb: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    _crash_then_resume(run_dir, monkeypatch, "wandb", "wandb")
    state = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    assert state["mode"] == "offline" and state["project"] == "metagrad"
    folders = [run_dir / name for name in state["offline_runs"]]  # one per session, the same run id
    assert len(folders) == 2 and all(f.name.endswith("-" + state["id"]) and f.is_dir() for f in folders)

    # History: every train and validation row once over both sessions, as in metrics.jsonl.
    history = [row for folder in folders for row in _wandb_history(folder)[0]]
    assert sorted(Counter(row["_step"] for row in history).items()) == [(s, 1) for s in range(1, 9)]
    logged = {row["_step"]: row for row in history}
    rows = read_metrics(run_dir)
    for row in rows:
        if row["split"] == "test":
            continue
        for tag, value in scalars(row).items():
            assert tag in logged[row["step"]], tag
            if tag.split("/")[1] not in WALL_CLOCK_COLUMNS:  # step 4 was logged before the crash
                assert logged[row["step"]][tag] == value, (row["step"], tag)
    # The config as the run's config, the test row as its summary.
    _, config, summary = _wandb_history(folders[1])
    assert config["meta.iterations"] == 8 and config["data.ways"] == 3
    test = rows[-1]
    assert test["split"] == "test"
    assert summary["test/acc"] == test["acc"] and summary["test/acc_ci95"] == test["acc_ci95"]
    assert summary["test/step"] == test["step"]


def test_wandb_rows_lost_in_a_crash_are_sent_again(tmp_path: Path, fake_data: list, offline_wandb: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # kill -9 loses what W&B had not flushed to its run file (every 15 s): here steps 3 and 4. The resumed
    # run reads the run file, is sent step 3 from metrics.jsonl (before the checkpoint) and redoes 4.
    run_dir = tmp_path / "run"
    real_log = loggers._Wandb.log

    def unflushed(self: Any, row: dict[str, Any]) -> None:
        if row["split"] == "test" or row["step"] < 3:
            real_log(self, row)

    with monkeypatch.context() as mp:
        mp.setattr(loggers._Wandb, "log", unflushed)
        _crash_at(mp, 5)
        with pytest.raises(_Crash):
            run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "wandb"}), quiet=True)
    run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "wandb"}), resume=True, quiet=True)
    state = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    steps = [[row["_step"] for row in _wandb_history(run_dir / name)[0]] for name in state["offline_runs"]]
    assert steps == [[1, 2], [3, 4, 5, 6, 7, 8]]


def test_a_new_wandb_project_on_resume_gets_the_whole_run(tmp_path: Path, fake_data: list,
                                                          offline_wandb: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        _crash_at(mp, 5)
        with pytest.raises(_Crash):
            run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "wandb"}), quiet=True)
    first = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "wandb", "run.wandb_project": "other"}),
        resume=True, quiet=True)
    state = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    assert state["project"] == "other" and state["id"] != first["id"]
    (folder,) = [run_dir / name for name in state["offline_runs"]]
    assert [row["_step"] for row in _wandb_history(folder)[0]] == list(range(1, 9))


def test_wandb_environment_variables_apply(tmp_path: Path, fake_data: list, offline_wandb: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    run_dir = tmp_path / "run"
    run(tiny_config(run_dir, **{"run.loggers": "wandb", "meta.iterations": 2}), quiet=True)
    state = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    assert state["project"] == "from-env" and state["mode"] == "offline"
    (folder,) = [Path(name) for name in state["offline_runs"]]
    assert folder.parent == tmp_path / "scratch" / "wandb" and not (run_dir / "wandb").exists()
    assert [row["_step"] for row in _wandb_history(folder)[0]] == [1, 2]


def test_a_missing_extra_fails_before_the_run_folder(tmp_path: Path, fake_data: list,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run_dir = tmp_path / "run"
    code = main(["train", "--run-dir", str(run_dir), "--logger", "tensorboard,wandb", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--logger wandb needs the wandb package" in err and "pip install 'metagrad[wandb]'" in err
    assert "Traceback" not in err and not run_dir.exists()


def test_a_failing_logger_is_turned_off_and_caught_up_on_resume(tmp_path: Path, fake_data: list,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "tensorboard"})
    real_log = loggers._TensorBoard.log

    def full_disk(self: Any, row: dict[str, Any]) -> None:
        if row["step"] >= 3:
            raise OSError(28, "No space left on device")
        real_log(self, row)

    with monkeypatch.context() as mp, caplog.at_level("WARNING", logger="metagrad"):
        mp.setattr(loggers._TensorBoard, "log", full_disk)
        run(config, quiet=True)  # the run is not lost to its logger
    assert (run_dir / "results.json").is_file()
    assert "tensorboard logging stopped at step 3 (OSError: [Errno 28] No space left" in caplog.text
    assert json.loads((run_dir / "loggers.json").read_text())["tensorboard"]["held"] == 2
    run(config, resume=True, quiet=True)  # finished: the meta-test again, and the rows TensorBoard lacks
    _assert_tensorboard_mirrors_metrics(run_dir)


def test_overwrite_replaces_the_tensorboard_log_and_a_linked_log_folder_is_refused(
        tmp_path: Path, fake_data: list) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **{"run.loggers": "tensorboard", "meta.iterations": 2})
    run(config, quiet=True)
    run(config, quiet=True, overwrite=True)  # the first run's events are removed with its other files
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_tensorboard_mirrors_metrics(run_dir)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "tensorboard").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="other/tensorboard is a link .*replace the link by a folder"):
        run(tiny_config(other, **{"run.loggers": "tensorboard"}), quiet=True)
    assert not list(elsewhere.iterdir())


def test_unknown_logger_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown logger 'mlflow' in run.loggers .*tensorboard, wandb"):
        tiny_config(tmp_path, **{"run.loggers": "tensorboard,mlflow"})


_KILL_SCRIPT = """
import json, os, signal, sys
import torch
from metagrad.training import loop, resolve_config, run, setup
from tiny_run import fake_load_dataset
torch.set_num_threads(1)
setup.load_dataset = fake_load_dataset()
real, calls = loop.compute_meta_gradients, [0]
def compute(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 5:  # past the checkpoint at 3: rows 4 are written, nothing is closed or flushed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
loop.compute_meta_gradients = compute
run(resolve_config(overrides=json.loads(sys.argv[1])), quiet=True)
"""


@pytest.mark.slow  # a subprocess that imports torch, TensorBoard and W&B: about 15 s on 2 shared cores
def test_both_loggers_after_kill_9(tmp_path: Path, fake_data: list, offline_wandb: None) -> None:
    # What the loggers had not written when the process died (TensorBoard flushes every 10 s and at
    # each checkpoint, W&B every 15 s) is sent again on resume; nothing is there twice.
    run_dir = tmp_path / "run"
    overrides = {**TINY_OVERRIDES, **OVERRIDES, "run.run_dir": str(run_dir),
                 "run.loggers": "tensorboard,wandb"}
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    killed = subprocess.run([sys.executable, str(script), json.dumps(overrides)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert max(r["step"] for r in read_metrics(run_dir)) == 4
    run(tiny_config(run_dir, **OVERRIDES, **{"run.loggers": "tensorboard,wandb"}), resume=True, quiet=True)
    _assert_tensorboard_mirrors_metrics(run_dir)
    state = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    steps = [row["_step"] for name in state["offline_runs"] for row in _wandb_history(run_dir / name)[0]]
    assert sorted(steps) == list(range(1, 9))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(logdir: Path, load_fast: str) -> tuple[subprocess.Popen, int]:
    """Start ``tensorboard --logdir`` on a free port of 127.0.0.1 (another one if its fast loader's own
    server took that port meanwhile)."""
    for _attempt in range(3):
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(port), "--reload_interval", "1", "--load_fast", load_fast],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            return server, port
        if "could not bind" not in (server.stderr.read() if server.stderr else ""):
            break
    pytest.fail(f"tensorboard did not start: {server.stderr.read() if server.stderr else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("load_fast", ["true", "false"])  # its Rust data server, and its Python loader
def test_tensorboard_serves_a_resumed_run_over_http(tmp_path: Path, fake_data: list, load_fast: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    _crash_then_resume(run_dir, monkeypatch, "tensorboard", "tensorboard")
    server, port = _serve(tmp_path, load_fast)
    try:
        query = urllib.parse.urlencode({"run": "run/tensorboard", "tag": "validation/acc"})
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
        deadline, points = time.monotonic() + 120, None
        while time.monotonic() < deadline and points is None:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
            except (OSError, ValueError):  # not serving yet, or the run not loaded yet
                time.sleep(1)
        assert points is not None, "TensorBoard did not answer within 2 minutes"
        expected = [(r["step"], r["acc"]) for r in read_metrics(run_dir) if r["split"] == "validation"]
        assert [(step, value) for _wall, step, value in points] == [
            (step, _float32(acc)) for step, acc in expected]  # each step once, after the resume too
        assert all(math.isfinite(value) for _w, _s, value in points)
    finally:
        server.terminate()
        server.wait(timeout=30)
