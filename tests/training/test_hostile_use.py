"""The run folder under hostile use, in-process on the tiny dataset: a run folder that holds another
run's files, checkpoints and configs that do not fit each other, divergence, failed writes, ``~`` and
relative folders. The same classes through real processes: tests/test_cli_processes.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import fake_load_dataset, tiny_config

from metagrad import cli
from metagrad.errors import ConfigError, TrainingError
from metagrad.training import evaluate_checkpoint, run, run_folder, setup
from metagrad.training.checkpoint import save_checkpoint

TINY_ARGS = ["--ways", "3", "--shots", "1", "--query-shots", "2", "--set", "model.hidden_size=8",
             "--meta-batch-size", "4", "--test-inner-steps", "2", "--eval-every", "2", "--eval-tasks", "4",
             "--test-tasks", "6", "--device", "cpu", "--iterations", "2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (2 iterations); tests copy what they damage."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "load_dataset", fake_load_dataset())
        run(tiny_config(run_dir, **{"meta.iterations": 2}), quiet=True)
    return run_dir


def _copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_config(run_dir: Path, section: str, key: str, value: object) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    config[section][key] = value
    (run_dir / "config.json").write_text(json.dumps(config))


def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ----------------------------------------------------------------------------------------- output pipes


@pytest.mark.parametrize("closed", ["stdout", "stderr", "both"])
def test_pipes_closed_early_never_stop_a_training(
    tmp_path: Path, fake_data: list, monkeypatch: pytest.MonkeyPatch, closed: str
) -> None:
    # `metagrad train ... | head -1`, its reader gone: a real pipe whose read end is closed.
    read, write = os.pipe()
    os.close(read)
    broken = open(write, "w", buffering=1)  # noqa: SIM115 (closed below)
    for name in ("stdout", "stderr") if closed == "both" else (closed,):
        monkeypatch.setattr(sys, name, broken)
    run_dir = tmp_path / "run"
    try:
        code = cli.main(["train", *TINY_ARGS, "--iterations", "4", "--log-every", "1",
                         "--run-dir", str(run_dir)])
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            broken.close()
    assert code == 0
    assert json.loads((run_dir / "results.json").read_text())["iterations"] == 4
    assert torch.load(run_dir / "latest.pt", weights_only=True)["iteration"] == 4


# ------------------------------------------------------------------------------------ one run per folder


@pytest.mark.parametrize("name", ["best.pt", "latest.pt", "metrics.jsonl", "results.json"])
def test_a_folder_with_run_files_but_no_config_is_never_overwritten(
    tmp_path: Path, fake_data: list, finished_run: Path, name: str
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).write_bytes((finished_run / name).read_bytes())
    with pytest.raises(ConfigError, match=rf"files of a run \({name}\) but no config.json; .*overwrite"):
        run(tiny_config(run_dir), quiet=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [name]


def test_overwrite_replaces_every_file_of_the_earlier_run(
    tmp_path: Path, fake_data: list, finished_run: Path
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    (run_dir / "eval_best.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")  # not a run file: kept
    run(tiny_config(run_dir, **{"meta.iterations": 3, "run.eval_every": 3}), quiet=True, overwrite=True)
    assert json.loads((run_dir / "results.json").read_text())["iterations"] == 3
    assert not (run_dir / "eval_best.json").exists() and not (run_dir / "best.prev.pt").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="choose one"):
        run(tiny_config(run_dir), resume=True, overwrite=True, quiet=True)


def test_overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start(
    tmp_path: Path, fake_data: list, finished_run: Path
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="ways"):
        run(tiny_config(run_dir, **{"data.ways": 11}), quiet=True, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in finished_run.iterdir())


# ------------------------------------------------------------------------- checkpoints that do not fit


def test_eval_refuses_a_config_edited_to_other_ways(tmp_path: Path, fake_data: list, finished_run: Path
                                                     ) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    _edit_config(run_dir, "data", "ways", 5)
    with pytest.raises(ConfigError, match=r"best\.pt was trained with data\.ways=3 but .*json says 5"):
        evaluate_checkpoint(run_dir)


def test_resume_refuses_a_config_edited_to_another_width(
    tmp_path: Path, fake_data: list, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    _edit_config(run_dir, "model", "hidden_size", 16)
    code, _, err = _main(capsys, "train", "--resume", "--run-dir", str(run_dir))
    assert code == 2
    assert "latest.pt was trained with model.hidden_size=8 but" in err and "says 16" in err


def test_a_checkpoint_of_another_width_names_the_parameter_shape(
    tmp_path: Path, fake_data: list, finished_run: Path
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    wide = tmp_path / "wide"
    run(tiny_config(wide, **{"meta.iterations": 2, "model.hidden_size": 4}), quiet=True)
    legacy = torch.load(wide / "best.pt", weights_only=True)
    del legacy["config"], legacy["checksum"]  # a best.pt from before checkpoints recorded their config
    torch.save(legacy, run_dir / "best.pt")
    with pytest.raises(ConfigError, match=r"parameter \S+ has shape \(4, .*\) in the checkpoint but \(8, "):
        evaluate_checkpoint(run_dir)


def test_eval_refuses_non_finite_parameters(tmp_path: Path, fake_data: list, finished_run: Path) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    best = torch.load(run_dir / "best.pt", weights_only=True)
    del best["checksum"]
    next(iter(best["params"].values())).fill_(float("nan"))
    torch.save(best, run_dir / "best.pt")
    (run_dir / "best.prev.pt").unlink(missing_ok=True)
    with pytest.raises(TrainingError, match="NaN or infinite values"):
        evaluate_checkpoint(run_dir)


def test_resume_refuses_a_checkpoint_that_lacks_the_optimizer(
    tmp_path: Path, fake_data: list, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    latest = torch.load(run_dir / "latest.pt", weights_only=True)
    del latest["optimizer"], latest["checksum"]
    save_checkpoint(latest, run_dir / "latest.pt")  # a valid checksum: made so, not damaged
    code, _, err = _main(capsys, "train", "--resume", "--run-dir", str(run_dir))
    assert code == 1 and "latest.pt is not a complete metagrad checkpoint (KeyError: 'optimizer')" in err


# ----------------------------------------------------------------------------------------- divergence


def test_a_nan_validation_writes_no_best_checkpoint(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    code, out, err = _main(capsys, "train", *TINY_ARGS, "--meta-lr", "1e30", "--eval-every", "1",
                           "--iterations", "4", "--run-dir", str(run_dir))
    assert code == 1 and out == ""
    assert "error: the validation loss is nan at iteration 1" in err
    assert not run_dir.exists()  # no checkpoint was written: a failed start leaves no run folder
    code, _, err = _main(capsys, "eval", str(run_dir))
    assert code == 2 and "is not a run folder" in err


def test_an_overflow_in_the_outer_step_is_the_nan_message(tmp_path: Path, fake_data: list,
                                                          capsys: pytest.CaptureFixture) -> None:
    code, _, err = _main(capsys, "train", *TINY_ARGS, "--meta-lr", "1e38", "--run-dir", str(tmp_path / "run"))
    assert code == 1
    assert "error: a value overflowed" in err and "at iteration 1" in err and "smaller --meta-lr" in err


# -------------------------------------------------------------------------------------- failed writes


REAL_WRITE = run_folder.write_text_atomically


def _fail_writing(monkeypatch: pytest.MonkeyPatch, name: str, code: int = errno.ENOSPC) -> None:
    """Make the atomic write of files named ``name`` fail as a full disk (or ``code``) would."""
    real = REAL_WRITE

    def write(path: Path, text: str) -> None:
        if path.name == name:
            raise OSError(code, os.strerror(code))
        real(path, text)

    monkeypatch.setattr(run_folder, "write_text_atomically", write)


def test_eval_prints_its_result_when_its_json_cannot_be_written(
    tmp_path: Path, fake_data: list, finished_run: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    _fail_writing(monkeypatch, "eval_best.json", errno.EROFS)
    code, out, err = _main(capsys, "eval", str(run_dir), "--json")
    assert code == 1
    assert "test accuracy" in out.splitlines()[0]
    assert json.loads(out.splitlines()[1])["test_tasks"] == 8
    assert f"error: cannot write {run_dir / 'eval_best.json'}: Read-only file system" in err
    assert not (run_dir / "eval_best.json").exists()


def test_train_prints_its_result_when_results_json_cannot_be_written(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _fail_writing(monkeypatch, "results.json")
    code, out, err = _main(capsys, "train", *TINY_ARGS, "--run-dir", str(run_dir))
    assert code == 1 and out.startswith("test accuracy ")
    assert "cannot write" in err and "No space left on device (the disk is full" in err
    assert (run_dir / "latest.pt").exists() and not (run_dir / "results.json").exists()
    monkeypatch.setattr(run_folder, "write_text_atomically", REAL_WRITE)  # space was freed
    assert _main(capsys, "train", "--resume", "--run-dir", str(run_dir))[0] == 0  # the meta-test again
    assert (run_dir / "results.json").exists()


def test_a_failed_metrics_write_names_the_file_and_how_to_continue(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metagrad.training import metrics

    real, calls = metrics.MetricsWriter.write, {"n": 0}

    def write(self: metrics.MetricsWriter, row: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            with self._failing_as(self.jsonl_path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, row)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    run_dir = tmp_path / "run"
    code, _, err = _main(capsys, "train", *TINY_ARGS, "--iterations", "6", "--run-dir", str(run_dir))
    assert code == 1
    assert f"error: cannot write {run_dir / 'metrics.jsonl'}: No space left on device" in err
    assert f"continue with: metagrad train --resume --run-dir {run_dir}" in err


def test_plot_into_a_missing_folder_and_a_damaged_metrics_line(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no" / "such" / "c.png"
    code, _, err = _main(capsys, "plot", str(finished_run), "--output", str(missing))
    assert code == 1 and "cannot write the plot" in err and "No such file or directory" in err
    run_dir = _copy_run(finished_run, tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "split": "train", "loss": 0.5, "ac\n'
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    code, _, err = _main(capsys, "plot", str(run_dir))
    assert code == 1 and f"line 2 of {run_dir / 'metrics.jsonl'} is not a metric row" in err


# ---------------------------------------------------------------------------------------------- paths


def test_tilde_and_relative_folders_are_resolved_once(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, work, elsewhere = tmp_path / "home", tmp_path / "work", tmp_path / "elsewhere"
    for folder in (home, work, elsewhere):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    code, _, err = _main(capsys, "train", *TINY_ARGS, "--run-dir=~/x", "--data-dir", "data",
                         "--cache-dir=~/cache")
    assert code == 0, err
    assert (home / "x" / "results.json").exists() and not (work / "~").exists()
    data = json.loads((home / "x" / "config.json").read_text())["data"]
    assert (data["data_dir"], data["cache_dir"]) == (str(work / "data"), str(home / "cache"))
    monkeypatch.chdir(elsewhere)  # the saved folders still point where the run read its data
    calls: list = []
    monkeypatch.setattr(setup, "load_dataset", fake_load_dataset(calls))
    assert _main(capsys, "eval", "~/x")[0] == 0
    assert calls[0][2]["data_dir"] == str(work / "data")


def test_eval_of_an_older_run_with_a_relative_data_folder_says_so(
    tmp_path: Path, fake_data: list, finished_run: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    _edit_config(run_dir, "data", "data_dir", "data")  # as config.json stored it before issue 21
    monkeypatch.chdir(tmp_path)
    evaluate_checkpoint(run_dir)
    assert "has a relative data_dir 'data': it is read from" in caplog.text and "--data-dir" in caplog.text
    assert fake_data[-1][2]["data_dir"] == str(tmp_path / "data")
    caplog.clear()
    evaluate_checkpoint(run_dir, data_dir=str(tmp_path))
    assert "relative" not in caplog.text


def test_a_meta_batch_too_large_for_memory_is_one_message(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture
) -> None:
    # 10^12 tasks: their index alone would take 8 TB, which the allocator refuses at once.
    code, _, err = _main(capsys, "train", *TINY_ARGS, "--meta-batch-size", "1000000000000",
                         "--run-dir", str(tmp_path / "run"))
    assert code == 1
    assert "\nerror: out of memory at iteration 1 (" in err and "Lower --meta-batch-size" in err
