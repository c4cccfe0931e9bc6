"""The experiment loop on the tiny dataset: run folder, resume bit for bit, signals, NaN, evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import TINY_OVERRIDES, fake_load_dataset, tiny_config

from metagrad.algorithms import MetaBatchOutput
from metagrad.data.episodes import task_generator
from metagrad.errors import ConfigError, TrainingError
from metagrad.training import TrainingInterrupted, evaluate_checkpoint, loop, run, setup
from metagrad.training.config import resolve_config
from metagrad.training.metrics import COLUMNS, WALL_CLOCK_COLUMNS, read_metrics

TIMING_KEYS = WALL_CLOCK_COLUMNS
RESULT_NUMBERS = ("test_accuracy", "test_ci95", "test_loss", "best_val_accuracy", "best_iteration",
                  "iterations")

# The reference run every interrupted run must reproduce: 8 iterations, validation every 2,
# a checkpoint every 3 (so an interruption usually falls between checkpoints).
RESUME_OVERRIDES = {"meta.iterations": 8, "run.checkpoint_every": 3}


class _Crash(Exception):
    """Stands in for kill -9: nothing of the loop runs after it (no checkpoint, no cleanup write)."""


def _without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _csv_without_timing(path: Path) -> list[list[str]]:
    lines = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name not in TIMING_KEYS]
    return [[line[i] for i in keep] for line in lines]


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "latest.pt", weights_only=True)["params"]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit-identical parameters (latest and best), metrics and results numbers."""
    for name in ("latest.pt", "best.pt"):
        ours = torch.load(run_dir / name, weights_only=True)
        theirs = torch.load(reference / name, weights_only=True)
        assert ours["iteration"] == theirs["iteration"]
        for key, tensor in theirs["params"].items():
            assert torch.equal(ours["params"][key], tensor), f"{name}: {key} differs"
    assert _without_timing(read_metrics(run_dir)) == _without_timing(read_metrics(reference))
    csv_ours, csv_ref = (_csv_without_timing(d / "metrics.csv") for d in (run_dir, reference))
    assert csv_ours == csv_ref
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert {k: ours[k] for k in RESULT_NUMBERS} == {k: theirs[k] for k in RESULT_NUMBERS}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of the resume tests' configuration."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "load_dataset", fake_load_dataset())
        run(tiny_config(run_dir, **RESUME_OVERRIDES), quiet=True)
    return run_dir


def _crash_at(monkeypatch: pytest.MonkeyPatch, iteration: int, action: Any = None) -> None:
    """Make iteration ``iteration``'s meta-gradient call crash (or run ``action`` first, then go on)."""
    real = loop.compute_meta_gradients
    calls = {"n": 0}

    def compute(*args: Any, **kwargs: Any) -> MetaBatchOutput:
        calls["n"] += 1
        if calls["n"] == iteration:
            if action is None:
                raise _Crash
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_meta_gradients", compute)


# ---------------------------------------------------------------------------------------------------


def test_run_writes_a_complete_run_folder(tmp_path: Path, fake_data: list,
                                          caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="metagrad"):
        results = run(tiny_config(run_dir), quiet=True)
    assert f"run folder {run_dir}, device cpu, 1 thread(s)" in caplog.messages
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json", "metrics.jsonl", "metrics.csv", "latest.pt", "best.pt", "results.json"}
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert set(results) >= {"preset", "algorithm", "dataset", "ways", "shots", "query_shots", "iterations",
                            "test_accuracy", "test_ci95", "test_tasks", "best_val_accuracy", "wall_time_s",
                            "device", "versions"}
    assert (results["preset"], results["ways"], results["iterations"], results["test_tasks"]) == (
        "omniglot-maml-5w1s", 3, 6, 8)
    assert results["device"] == "cpu" and set(results["versions"]) == {"python", "torch", "metagrad"}
    assert results["cpu_threads"] == torch.get_num_threads() == 1  # the tests' count (conftest)
    assert 0 <= results["test_accuracy"] <= 1 and results["test_ci95"] >= 0

    rows = read_metrics(run_dir)
    assert [(r["step"], r["split"]) for r in rows] == [
        (1, "train"), (2, "train"), (2, "validation"), (3, "train"), (4, "train"), (4, "validation"),
        (5, "train"), (6, "train"), (6, "validation"), (results["best_iteration"], "test")]
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert all(math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 for r in rows)
    val = [r for r in rows if r["split"] == "validation"]
    assert results["best_val_accuracy"] == max(r["acc"] for r in val)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["iteration"] == results["best_iteration"]

    # Every split is loaded with the config's dataset options.
    assert [(name, split) for name, split, _ in fake_data] == [
        ("omniglot", "train"), ("omniglot", "validation"), ("omniglot", "test")]
    assert fake_data[0][2] == {"data_dir": None, "cache_dir": None, "rotations": True,
                               "split_scheme": "shuffled"}


def test_same_config_same_numbers(tmp_path: Path, fake_data: list, reference_run: Path) -> None:
    run(tiny_config(tmp_path / "again", **RESUME_OVERRIDES), quiet=True)
    _assert_same_run(tmp_path / "again", reference_run)


def test_tasks_per_chunk_only_changes_rounding(tmp_path: Path, fake_data: list) -> None:
    # One task's graph at a time (learn2learn's memory) trains the same model, up to float32 rounding.
    # Two iterations: Adam's first steps are about meta_lr times the sign of each gradient, so over more
    # iterations this tiny network carries the rounding into whole steps (seen from the fourth on an
    # AVX-512 machine: 2e-7 after three iterations, 4e-4 after four, 3e-3 after eight).
    params = {}
    for chunk in (0, 1):
        config = tiny_config(tmp_path / str(chunk), **{"meta.iterations": 2, "meta.tasks_per_chunk": chunk})
        run(config, quiet=True)
        saved = json.loads((tmp_path / str(chunk) / "config.json").read_text())
        assert saved["meta"]["tasks_per_chunk"] == chunk
        params[chunk] = _final_params(tmp_path / str(chunk))
    for name, tensor in params[0].items():
        if name.endswith("conv.bias"):
            # BatchNorm cancels these biases: their true gradient is 0, and Adam turns the rounding
            # noise that stands in for it into full-size steps, which differ with the chunking.
            continue
        torch.testing.assert_close(params[1][name], tensor, rtol=1e-4, atol=1e-5)


def test_config_json_reproduces_the_run(tmp_path: Path, fake_data: list, reference_run: Path) -> None:
    config = resolve_config(config_file=reference_run / "config.json",
                            overrides={"run.run_dir": str(tmp_path / "r")})
    run(config, quiet=True)
    _assert_same_run(tmp_path / "r", reference_run)


@pytest.mark.parametrize("crash_at", [5, 7])
def test_resume_after_a_crash_is_bit_identical(
    tmp_path: Path, fake_data: list, reference_run: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **RESUME_OVERRIDES)
    with monkeypatch.context() as mp:
        _crash_at(mp, crash_at)
        with pytest.raises(_Crash):
            run(config, quiet=True)
    # Rows past the checkpoint (iteration 3 or 6) were written and must be cut back on resume.
    assert max(r["step"] for r in read_metrics(run_dir)) == crash_at - 1
    assert torch.load(run_dir / "latest.pt", weights_only=True)["iteration"] == 3 * ((crash_at - 1) // 3)
    run(config, resume=True, quiet=True)
    _assert_same_run(run_dir, reference_run)


def test_resume_from_the_previous_checkpoint_when_latest_is_corrupt(
    tmp_path: Path, fake_data: list, reference_run: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **RESUME_OVERRIDES)
    with monkeypatch.context() as mp:
        _crash_at(mp, 8)
        with pytest.raises(_Crash):
            run(config, quiet=True)
    latest = run_dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    run(config, resume=True, quiet=True)  # from latest.prev.pt (iteration 3)
    assert "latest.pt is unreadable" in caplog.text
    _assert_same_run(run_dir, reference_run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_stops_and_resume_is_bit_identical(
    tmp_path: Path, fake_data: list, reference_run: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **RESUME_OVERRIDES)
    # Whatever was there before (Python's default_int_handler; SIG_IGN when the tests run as a
    # background job of a non-interactive shell) must be back afterwards.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with monkeypatch.context() as mp:
        _crash_at(mp, 4, action=lambda: os.kill(os.getpid(), signum))
        expected = f"{signal.Signals(signum).name} received: stopped after iteration 4"
        with pytest.raises(TrainingInterrupted, match=expected) as info:
            run(config, quiet=True)
    assert info.value.exit_code == 128 + signum
    assert "--resume --run-dir" in str(info.value)
    assert torch.load(run_dir / "latest.pt", weights_only=True)["iteration"] == 4
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    run(config, resume=True, quiet=True)
    _assert_same_run(run_dir, reference_run)


_KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from metagrad.training import loop, resolve_config, run, setup
    torch.set_num_threads(1)  # as the tests' process
    from tiny_run import fake_load_dataset
    setup.load_dataset = fake_load_dataset()
    real = loop.compute_meta_gradients
    def slow(*args, **kwargs):  # so that the parent can kill the run mid-way
        time.sleep(0.3)
        return real(*args, **kwargs)
    loop.compute_meta_gradients = slow
    run(resolve_config(overrides=json.loads(sys.argv[1])), quiet=True)
""")


def test_resume_after_kill_9_is_bit_identical(
    tmp_path: Path, fake_data: list, reference_run: Path
) -> None:
    run_dir = tmp_path / "run"
    overrides = {**TINY_OVERRIDES, **RESUME_OVERRIDES, "run.run_dir": str(run_dir)}
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    process = subprocess.Popen([sys.executable, str(script), json.dumps(overrides)], env=env,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            steps = [r["step"] for r in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
            if steps and max(steps) >= 5:  # past the checkpoint at 3, before the one at 6
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert not (run_dir / "results.json").exists()
    run(tiny_config(run_dir, **RESUME_OVERRIDES), resume=True, quiet=True)
    _assert_same_run(run_dir, reference_run)


def test_resume_before_the_first_checkpoint_starts_over(
    tmp_path: Path, fake_data: list, reference_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **RESUME_OVERRIDES)
    with monkeypatch.context() as mp:
        _crash_at(mp, 2)
        with pytest.raises(_Crash):
            run(config, quiet=True)
    run(config, resume=True, quiet=True)
    _assert_same_run(run_dir, reference_run)


def test_nan_loss_stops_with_the_iteration_and_keeps_the_checkpoint(
    tmp_path: Path, fake_data: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    real = loop.compute_meta_gradients
    calls = {"n": 0}

    def compute(learner, episode, meta, *rest):
        calls["n"] += 1
        if calls["n"] == 5:
            nan = torch.tensor(float("nan"))
            grad_sum = torch.zeros(sum(p.numel() for p in learner.params.values()), dtype=torch.float64)
            return MetaBatchOutput(nan, nan.repeat(4), torch.zeros(4)), grad_sum
        return real(learner, episode, meta, *rest)

    monkeypatch.setattr(loop, "compute_meta_gradients", compute)
    config = tiny_config(run_dir, **{"run.checkpoint_every": 3})
    with pytest.raises(TrainingError, match=r"loss is nan at iteration 5: .*the last good checkpoint is "
                                            r".*latest.pt; try a smaller --meta-lr"):
        run(config, quiet=True)
    checkpoint = torch.load(run_dir / "latest.pt", weights_only=True)
    assert checkpoint["iteration"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint["params"].values())
    assert max(r["step"] for r in read_metrics(run_dir)) == 4
    assert not (run_dir / "results.json").exists()


def test_nan_loss_at_the_first_iteration(tmp_path: Path, fake_data: list) -> None:
    # An absurd inner learning rate blows the adapted parameters up.
    config = tiny_config(tmp_path / "run", **{"meta.inner_lr": 1e30, "meta.inner_steps": 3})
    with pytest.raises(TrainingError, match="at iteration 1: .*no checkpoint was written yet"):
        run(config, quiet=True)


def test_runs_warn_when_threads_spin_under_libgomps_default(
        tmp_path: Path, fake_data: list, reference_run: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A process the metagrad command did not start, with none of libgomp's variables set (conftest
    # set them for the suite; the warning reads the environment when a run starts)
    from metagrad import _openmp

    for name in (*_openmp.USER_VARIABLES, _openmp.ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level("WARNING", logger="metagrad"):
            evaluate_checkpoint(reference_run, test_tasks=2)
            run(tiny_config(tmp_path / "run"), quiet=True)
    finally:
        torch.set_num_threads(before)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("spin while they wait" in w for w in warnings)


def test_evaluate_checkpoint_reproduces_the_results(fake_data: list, reference_run: Path) -> None:
    results = json.loads((reference_run / "results.json").read_text())
    evaluation = evaluate_checkpoint(reference_run)
    for key in ("test_accuracy", "test_ci95", "test_loss", "test_tasks", "test_inner_steps"):
        assert evaluation[key] == results[key]
    assert evaluation["checkpoint_iteration"] == results["best_iteration"]
    assert evaluation["cpu_threads"] == torch.get_num_threads()
    assert json.loads((reference_run / "eval_best.json").read_text()) == evaluation

    assert evaluation["status"] == "complete"
    assert (evaluation["iterations"], evaluation["iterations_planned"]) == (8, 8)
    assert evaluation["training_wall_time_s"] > 0

    latest = evaluate_checkpoint(reference_run, checkpoint="latest", test_tasks=4)
    assert latest["checkpoint_iteration"] == 8 and latest["test_tasks"] == 4


def test_evaluating_an_interrupted_run_says_how_far_it_got(
    tmp_path: Path, fake_data: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metagrad.training.report import find_runs, results_table

    run_dir = tmp_path / "runs" / "stopped"
    with monkeypatch.context() as mp:
        _crash_at(mp, 5, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(TrainingInterrupted):  # device auto: the table names the device that ran
            run(tiny_config(run_dir, **RESUME_OVERRIDES, **{"run.device": "auto"}), quiet=True)
    assert "not tested" in results_table(find_runs([tmp_path / "runs"]))
    evaluation = evaluate_checkpoint(run_dir)
    best = torch.load(run_dir / "best.pt", weights_only=True)["iteration"]
    assert evaluation["checkpoint_iteration"] == best and best in (2, 4)  # validation every 2 iterations
    assert evaluation["status"] == "partial: 5 of 8 iterations trained"
    assert (evaluation["iterations"], evaluation["iterations_planned"]) == (5, 8)
    row = results_table(find_runs([tmp_path / "runs"])).splitlines()[-1]
    accuracy = f"{100 * evaluation['test_accuracy']:.2f} ± {100 * evaluation['test_ci95']:.2f}"
    config = tiny_config(run_dir)
    assert (f"| stopped | {config.preset} | {config.data.split_scheme} | {accuracy} (eval of best.pt, "
            f"iteration {best}) | {evaluation['test_tasks']} | 5/8 |") in row
    assert row.endswith(" | cpu |") and evaluation["device"] == "cpu"
    assert not (run_dir / "results.json").exists()  # an evaluation is not the run's final result


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"checkpoint": "first"}, "--checkpoint must be best or latest"),
     ({"test_tasks": 1}, "test_tasks .* must be at least 2"),
     ({"device": "gpu"}, "unknown device 'gpu'")],
)
def test_evaluate_checkpoint_bad_options(
    reference_run: Path, fake_data: list, kwargs: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate_checkpoint(reference_run, **kwargs)


def test_evaluate_checkpoint_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a run folder"):
        evaluate_checkpoint(tmp_path)


def test_resume_without_a_run_is_a_config_error(tmp_path: Path, fake_data: list) -> None:
    with pytest.raises(ConfigError, match="no run to resume in .*empty"):
        run(tiny_config(tmp_path / "empty"), resume=True, quiet=True)
    with pytest.raises(ConfigError, match="--resume needs the run folder"):
        run(resolve_config(overrides=TINY_OVERRIDES), resume=True, quiet=True)


def test_resume_with_other_settings_is_a_config_error(fake_data: list, reference_run: Path) -> None:
    with pytest.raises(ConfigError, match="cannot change meta.iterations when resuming"):
        run(tiny_config(reference_run, **{**RESUME_OVERRIDES, "meta.iterations": 9}), resume=True, quiet=True)


def test_a_new_run_never_overwrites_one(tmp_path: Path, fake_data: list, reference_run: Path) -> None:
    before = (reference_run / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        run(tiny_config(reference_run, **RESUME_OVERRIDES), quiet=True)
    assert (reference_run / "metrics.jsonl").read_bytes() == before


def test_impossible_task_shape_fails_before_the_run_folder_exists(tmp_path: Path, fake_data: list) -> None:
    with pytest.raises(ConfigError, match="ways"):
        run(tiny_config(tmp_path / "run", **{"data.ways": 11}), quiet=True)
    assert not (tmp_path / "run").exists()


def test_default_run_folder(tmp_path: Path, fake_data: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = resolve_config(overrides={**TINY_OVERRIDES, "meta.iterations": 1, "run.test_tasks": 2})
    results = run(config, quiet=True)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("omniglot-maml-5w1s-")
    assert results["run_dir"] == str(Path("runs") / folder.name)


def test_unvectorized_cosine_anil_run(tmp_path: Path, fake_data: list) -> None:
    config = tiny_config(tmp_path / "run", **{"meta.algorithm": "anil", "meta.vectorize": False,
                                              "meta.lr_schedule": "cosine", "meta.iterations": 4})
    run(config, quiet=True)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert lrs == [0.001 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]


def test_progress_lines_without_a_terminal(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture
) -> None:
    results = run(tiny_config(tmp_path / "run", **{"run.log_every": 3}))
    out, err = capsys.readouterr()
    assert out == ""  # stdout carries results only
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(r["step"], r["split"]) for r in lines] == [
        (2, "validation"), (3, "train"), (4, "validation"), (6, "train"), (6, "validation"),
        (results["best_iteration"], "test")]


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from metagrad.training.progress import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with Progress(total=4, initial=1, log_every=1) as progress:
        assert progress.interactive
        progress.row({"step": 2, "split": "train", "loss": 1.25, "acc": 0.5, "tasks_per_sec": 64.0})
        progress.row({"step": 2, "split": "validation", "loss": 1.5, "acc": 0.4})
    out, err = capsys.readouterr()
    assert "2/4" in err and "loss=1.2500" in err and "acc=0.500" in err and "tasks/s=64" in err
    assert out == "" and '"split": "validation"' in err


def test_task_streams_are_independent_and_seeded() -> None:
    draws = {purpose: torch.rand(4, generator=task_generator(0, purpose)) for purpose in
             ("train", "validation", "test")}
    assert not torch.equal(draws["train"], draws["validation"])
    assert torch.equal(torch.rand(4, generator=task_generator(0, "train")), draws["train"])
    assert not torch.equal(torch.rand(4, generator=task_generator(1, "train")), draws["train"])


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert setup.resolve_device("auto").type == expected
    assert setup.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            setup.resolve_device("cuda")
