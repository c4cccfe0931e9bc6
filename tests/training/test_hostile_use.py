"""The run folder under hostile use, in-process on the tiny dataset: a run folder that holds another
run's files, checkpoints and configs that do not fit each other, divergence, failed writes, ``~`` and
relative folders. The same classes through real processes: tests/test_cli_processes.py."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_run import fake_load_dataset, tiny_config

from metagrad import cli
from metagrad.errors import ConfigError, TrainingError
from metagrad.training import evaluate_checkpoint, run, run_folder, setup, signals
from metagrad.training.checkpoint import load_checkpoint, save_checkpoint

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


def test_a_meta_batch_too_large_for_memory_is_refused_with_the_estimate_before_anything(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture
) -> None:
    # 10^12 tasks: terabytes even one task at a time; refused before the run folder or any tensor exists.
    code, _, err = _main(capsys, "train", *TINY_ARGS, "--meta-batch-size", "1000000000000",
                         "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert "error: meta.meta_batch_size (--meta-batch-size) = 1000000000000 tasks need at least " in err
    assert "GiB available; lower --meta-batch-size" in err and not (tmp_path / "run").exists()


def test_the_memory_estimate_is_checked_against_what_is_available(
    tmp_path: Path, fake_data: list, finished_run: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rule: the whole episode + one task's activations > available memory -> refused with the
    # estimate, for training and evaluation; the same settings with enough memory run.
    from metagrad.training import failures

    model = setup.make_model(tiny_config(tmp_path).model, 3, (1, 8, 8))
    episode, compute = failures.memory_per_task(model, (1, 8, 8), num_classes=10, per_class=20, ways=3,
                                                samples=3)
    assert episode > 3 * 3 * 64 * 4 and compute > 0  # 9 images of 1x8x8, and the layers' outputs for them
    monkeypatch.setattr(failures, "available_memory", lambda device: 4 * episode + compute - 1)
    code, _, err = _main(capsys, "train", *TINY_ARGS, "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "error: meta.meta_batch_size (--meta-batch-size) = 4 tasks need at least " in err
    assert "(at most about 3 would fit)" in err, err
    monkeypatch.setattr(failures, "available_memory", lambda device: 4 * episode + compute)
    assert _main(capsys, "train", *TINY_ARGS, "--run-dir", str(tmp_path / "run"))[0] == 0
    monkeypatch.setattr(failures, "available_memory", lambda device: 1)
    code, _, err = _main(capsys, "eval", str(finished_run))
    assert code == 2 and "error: a chunk of test tasks = 4 tasks need at least" in err, err


# --------------------------------------------------------------------------- writes stay in the run folder


@pytest.fixture(scope="module")
def run_with_top(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run that keeps its 2 best checkpoints in top/, and an eval file."""
    run_dir = tmp_path_factory.mktemp("top") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "load_dataset", fake_load_dataset())
        run(tiny_config(run_dir, **{"meta.iterations": 4, "run.eval_every": 1, "run.keep_best": 2}),
            quiet=True)
        evaluate_checkpoint(run_dir)
    return run_dir


def _written_names() -> list[str]:
    """Every name a run, an evaluation or a plot writes in a run folder."""
    return sorted({*run_folder.RUN_FILES, ".lock", "eval_best.json", run_folder.TOP_DIR})


def _outside_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["resume", "overwrite", "eval", "plot"])
@pytest.mark.parametrize("name", _written_names())
def test_no_write_or_delete_follows_a_link_out_of_the_run_folder(
    tmp_path: Path, fake_data: list, run_with_top: Path, capsys: pytest.CaptureFixture, name: str,
    command: str,
) -> None:
    # The rule: whatever a run, an evaluation or a plot writes or removes in its folder, a symbolic link
    # there (to another run's file or folder) is replaced or refused with a message; where it points
    # is never written, truncated or deleted.
    run_dir = tmp_path / "run"
    shutil.copytree(run_with_top, run_dir)
    outside = tmp_path / "another-run"
    outside.mkdir()
    target = outside / name
    if (run_dir / name).exists():  # the file or folder itself moves out; the link points at it
        shutil.move(run_dir / name, target)
    else:
        target.write_text("another run's file\n")
    (run_dir / name).symlink_to(target)
    before = _outside_snapshot(outside)
    argv = {"resume": ["train", "--resume", "--run-dir", str(run_dir), "-q"],
            "overwrite": ["train", *TINY_ARGS, "--set", "run.keep_best=2", "--overwrite", "--run-dir",
                          str(run_dir), "-q"],
            "eval": ["eval", str(run_dir), "--ensemble", "2"] if name != run_folder.TOP_DIR else
                    ["eval", str(run_dir)],
            "plot": ["plot", str(run_dir)]}[command]
    code, _, err = _main(capsys, *argv)
    assert _outside_snapshot(outside) == before, err  # nothing written, truncated or deleted there
    if code != 0:  # refused: the message names the link
        assert "symbolic link" in err and name in err, err


# ------------------------------------------------------------------------ output encodings and failures


def _stream(encoding: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict", write_through=True)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "cp1252"])
def test_every_command_writes_its_output_in_any_encoding(
    tmp_path: Path, fake_data: list, finished_run: Path, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    # The rule: PYTHONIOENCODING or a terminal's encoding never fails a command; what it lacks is spelled
    # in ASCII (``±`` as ``+/-``), here with a run folder whose name is not ASCII.
    run_dir = _copy_run(finished_run, tmp_path / "прогон-±")
    for argv in (["train", *TINY_ARGS, "--run-dir", str(tmp_path / "новый")], ["eval", str(run_dir)],
                 ["eval", str(run_dir), "--json"], ["results", str(run_dir)]):
        out, err = _stream(encoding), _stream(encoding)
        with monkeypatch.context() as mp:
            mp.setattr(sys, "stdout", out)
            mp.setattr(sys, "stderr", err)
            code = cli.main(argv)
        text = out.buffer.getvalue().decode(encoding)
        assert code == 0, (argv, err.buffer.getvalue())
        assert "Traceback" not in err.buffer.getvalue().decode(encoding)
        assert "+/-" in text or "±" in text or "test_accuracy" in text, (argv, text)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_full_stdout_after_the_result_is_saved_exits_0(
    tmp_path: Path, fake_data: list, finished_run: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # stdout redirected to a full disk (/dev/full): the result is in the run folder, the command succeeds.
    run_dir = tmp_path / "run" if command == "train" else _copy_run(finished_run, tmp_path / "run")
    argv = ["train", *TINY_ARGS, "--run-dir", str(run_dir)] if command == "train" else ["eval", str(run_dir)]
    with open("/dev/full", "w") as full, monkeypatch.context() as mp:
        mp.setattr(sys, "stdout", full)
        code = cli.main(argv)
    assert code == 0
    assert (run_dir / ("results.json" if command == "train" else "eval_best.json")).is_file()


DEEP = '{"a":' * 100_000 + "1" + "}" * 100_000
"""JSON nested deeper than Python's parser goes (a RecursionError in ``json.loads``)."""


@pytest.mark.parametrize("name", ["results.json", "eval_best.json", "config.json", "metrics.jsonl"])
def test_json_nested_too_deeply_is_a_damaged_file_not_a_traceback(
    tmp_path: Path, fake_data: list, finished_run: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    other = _copy_run(finished_run, tmp_path / "other")
    (run_dir / name).write_text(DEEP + "\n")
    if name == "results.json":  # and a file that never ends: a FIFO is not read
        (other / name).unlink()
        os.mkfifo(other / name)
    code, out, err = _main(capsys, "results", str(run_dir), str(other))
    assert code == 0 and "| other |" in out, err  # the table is printed, the other run's row included
    assert "| run |" in out and ("nested too deeply" in out or name in ("eval_best.json", "metrics.jsonl"))
    code, out, err = _main(capsys, "plot", str(run_dir))
    assert code in (0, 1) and (code == 0 or name in err)


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Every write past ``limit`` bytes of a file fails with EFBIG, as on a disk that is full there."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not the signal's kill
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def _glyph(path: Path, seed: int, mode: str = "L") -> None:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8, generator=generator)
    Image.fromarray(pixels.numpy() if mode == "RGB" else pixels[..., 0].numpy(), mode).save(path)


def _glyph_run(tmp_path: Path, run_dir: Path) -> list[str]:
    """A folder dataset of 3 grayscale classes x 3 images in ``tmp_path/data/glyphs``; the train command."""
    for split in ("train", "validation", "test"):
        for c in range(3):
            (tmp_path / "data" / "glyphs" / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                _glyph(tmp_path / "data" / "glyphs" / split / f"c{c}" / f"{i}.png", 10 * c + i)
    return ["train", *TINY_ARGS, "--iterations", "4", "--set", 'data.dataset="folder"', "--set",
            'data.folder="glyphs"', "--set", 'data.split_scheme="folders"', "--set", "data.rotations=false",
            "--set", 'model.name="omniglot-cnn"', "--data-dir", str(tmp_path / "data"), "--cache-dir",
            str(tmp_path / "cache"), "--run-dir", str(run_dir)]


@pytest.mark.parametrize("limit", [100, 4_000, 30_000])  # below config.json; the caches; the checkpoints
def test_a_full_disk_under_any_write_is_one_message_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture, limit: int
) -> None:
    # Writes through torch (checkpoints, the dataset cache) fail as RuntimeErrors inside torch; every
    # write is named with its cause, the last good files stay, and --resume continues once space is back.
    run_dir = tmp_path / "run"
    argv = _glyph_run(tmp_path, run_dir)
    with _file_size_limit(limit):
        code = cli.main(argv)
    _, err = capsys.readouterr()
    assert "Traceback" not in err and "RuntimeError" not in err, err
    if code != 0:
        assert code == 1 and "File too large" in err, err
    if (run_dir / "config.json").exists():
        code, _, err = _main(capsys, "train", "--resume", "--run-dir", str(run_dir))
    else:
        code, _, err = _main(capsys, *argv)
    assert code == 0, err
    assert json.loads((run_dir / "results.json").read_text())["iterations"] == 4


CHANGES = {
    "nothing": lambda train: None,
    "a class added": lambda train: shutil.copytree(train / "c0", train / "c3"),
    "a class renamed": lambda train: (train / "c2").rename(train / "c9"),
    "an image replaced": lambda train: _glyph(train / "c1" / "2.png", 99),
    "an image more per class": lambda train: [_glyph(train / f"c{c}" / "3.png", 9 + c) for c in range(3)],
    "colour": lambda train: _glyph(train / "c0" / "0.png", 0, "RGB"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_resumed_run_trains_on_the_data_it_started_with(
    tmp_path: Path, capsys: pytest.CaptureFixture, change: str
) -> None:
    # The rule: --resume finds the data of latest.pt (counts, shape, class names, pixels) or is refused,
    # naming the split and what changed, before anything is written.
    run_dir = tmp_path / "run"
    argv = _glyph_run(tmp_path, run_dir)
    code, _, err = _main(capsys, *argv[:argv.index("--iterations") + 1], "2",
                         *argv[argv.index("--iterations") + 2:], "--checkpoint-every", "1")
    assert code == 0, err
    _edit_config(run_dir, "meta", "iterations", 4)  # as if it had been stopped after iteration 2
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    CHANGES[change](tmp_path / "data" / "glyphs" / "train")
    code, _, err = _main(capsys, "train", "--resume", "--run-dir", str(run_dir))
    if change == "nothing":
        assert code == 0, err
        return
    assert code == 1 and f"cannot resume from {run_dir / 'latest.pt'}: the train split has " in err, err
    assert "when the run started" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before


# ------------------------------------------------------------------------------ every phase stops


PHASES = {  # a phase far longer than the test waits, and where it is
    "the first step of a huge meta-batch": ["--meta-batch-size", "200000", "--iterations", "1"],
    "a huge validation": ["--eval-tasks", "2000000", "--eval-every", "1", "--iterations", "2",
                          "--checkpoint-every", "1"],
    "a huge meta-test": ["--test-tasks", "2000000", "--iterations", "1"],
}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("phase", list(PHASES))
def test_every_phase_stops_within_seconds_of_a_signal(
    tmp_path: Path, fake_data: list, capsys: pytest.CaptureFixture, phase: str, signum: int
) -> None:
    # The rule: SIGINT/SIGTERM ends any phase within GRACE_S (+ one torch operation), with one message,
    # the signal's exit status and the last checkpoint valid.
    run_dir = tmp_path / "run"
    sent = {}

    def send() -> None:
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signum)

    timer = threading.Timer(3.0, send)
    timer.start()
    try:
        code, _, err = _main(capsys, "train", *TINY_ARGS, *PHASES[phase], "--run-dir", str(run_dir))
    finally:
        timer.cancel()
    assert "at" in sent, err  # the phase was still running when the signal was sent
    stopped_after = time.monotonic() - sent["at"]
    assert code == 128 + signum, err
    assert stopped_after < signals.GRACE_S + 3, stopped_after
    assert f"{signal.Signals(signum).name} received" in err and "--resume" in err, err
    if (run_dir / "latest.pt").exists():
        assert load_checkpoint(run_dir / "latest.pt") is not None  # the last checkpoint is intact
