"""The ``metagrad`` command: train, eval, plot, results end to end; data; bench; every bad configuration."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from metagrad import cli
from metagrad.algorithms import ALGORITHMS
from metagrad.training import loop, setup
from metagrad.training.metrics import WALL_CLOCK_COLUMNS, read_metrics

sys.path.insert(0, str(Path(__file__).parent / "training"))
from repo_scripts import load_script
from tiny_run import fake_load_dataset

TINY = ["--ways", "3", "--shots", "1", "--query-shots", "2", "--set", "model.hidden_size=8",
        "--meta-batch-size", "4", "--test-inner-steps", "2", "--eval-every", "2", "--eval-tasks", "4",
        "--test-tasks", "6", "--device", "cpu"]
"""Options that make ``metagrad train`` a run of a second on the tiny dataset."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/training/conftest.py
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup, "load_dataset", fake_load_dataset())


def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_plot_results_end_to_end(
    tmp_path: Path, fake_data: None, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "runs" / "first"
    code, out, err = _main(capsys, "train", *TINY, "--iterations", "3", "--run-dir", str(run_dir))
    assert code == 0, err
    assert f"run folder {run_dir}" in out and "test accuracy" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["iterations"], results["test_tasks"], results["ways"]) == (3, 6, 3)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["meta"]["iterations"] == 3 and config["model"]["hidden_size"] == 8

    code, out, err = _main(capsys, "eval", str(run_dir), "--json")
    assert code == 0, err
    evaluation = json.loads(out.splitlines()[-1])
    assert evaluation["test_accuracy"] == results["test_accuracy"]  # the same test tasks, the same model
    assert "test accuracy" in out.splitlines()[0] and (run_dir / "eval_best.json").exists()
    code, out, err = _main(capsys, "eval", str(run_dir), "--checkpoint", "latest", "--test-tasks", "4")
    assert code == 0 and "latest.pt, iteration 3" in out and "4 tasks" in out

    code, out, err = _main(capsys, "plot", str(run_dir))
    assert code == 0, err
    png = run_dir / "learning_curves.png"
    assert out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # A second, unfinished run: results shows how far it got.
    (tmp_path / "runs" / "second").mkdir()
    (tmp_path / "runs" / "second" / "config.json").write_text(json.dumps({"preset": "omniglot-anil-5w1s"}))
    code, out, err = _main(capsys, "results", str(tmp_path / "runs"))
    assert code == 0, err
    lines = out.splitlines()
    # The published number stands beside a run of the preset as packaged; the tiny run is not one.
    assert lines[0] == ("| run | preset | split | paper (%) | test accuracy (%) ± 95% CI | test tasks "
                        "| iterations | wall time | device |")
    acc = f"{100 * results['test_accuracy']:.2f} ± {100 * results['test_ci95']:.2f}"
    assert lines[2].startswith(f"| first | omniglot-maml-5w1s | {config['data']['split_scheme']} | "
                               "n/a: not the preset (data.ways, ")
    assert f" | {acc} | 6 | 3 | " in lines[2] and lines[2].endswith(" | cpu |")
    assert lines[3] == ("| second | omniglot-anil-5w1s | shuffled | none published (ANIL reports 20-way "
                        "Omniglot only) | (not tested) |  | 0/60000 |  |  |")


def test_meta_sgd_preset_trains_and_evaluates(tmp_path: Path, fake_data: None,
                                              capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "metasgd"
    code, out, err = _main(capsys, "train", "--preset", "omniglot-metasgd-5w1s", *TINY, "--iterations", "3",
                           "--run-dir", str(run_dir))
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    rates = torch.load(run_dir / "best.pt", weights_only=True)["inner_lrs"]
    assert rates and all(r.min() > 0 for r in rates.values())
    code, out, err = _main(capsys, "eval", str(run_dir), "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["test_accuracy"] == results["test_accuracy"]


MAMLPP_PRESETS = [f"omniglot-mamlpp-{ways}w{shots}s" for ways in (5, 20) for shots in (1, 5)] + [
    f"mini-imagenet-mamlpp-5w{shots}s" for shots in (1, 5)]
SMALLER = ["--set", "model.hidden_size=4", "--meta-batch-size", "2", "--set", "meta.iterations_per_epoch=1",
           "--eval-every", "1", "--eval-tasks", "2", "--test-tasks", "2", "--device", "cpu"]
"""A MAML++ preset at its own task shapes, inner steps and options, on a narrow network and few tasks."""


def _dataset_shaped_like(name: str, split: str, **_: Any) -> Any:
    """Random images of the dataset's real shape: 25 classes x 20 images (enough for 20-way 5-shot)."""
    from metagrad.bench import IMAGE_SHAPES
    from metagrad.data.datasets import FewShotDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (25, 20, *IMAGE_SHAPES[name]), dtype=torch.uint8, generator=g)
    return FewShotDataset(name, split, images, [f"class{i}" for i in range(25)])


@pytest.mark.parametrize("preset", MAMLPP_PRESETS)
def test_mamlpp_presets_train_and_evaluate(preset: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup, "load_dataset", _dataset_shaped_like)
    run_dir = tmp_path / "run"
    code, out, err = _main(capsys, "train", "--preset", preset, *SMALLER, "--iterations", "1",
                           "--run-dir", str(run_dir))
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert any("@step4" in k for k in best["params"]) and any(k.startswith("4.") for k in best["inner_lrs"])
    code, out, err = _main(capsys, "eval", str(run_dir), "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["test_accuracy"] == results["test_accuracy"]


def test_bench_a_mamlpp_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `metagrad bench --preset omniglot-mamlpp-5w1s`, its task shapes and options on a narrow network
    narrow = tmp_path / "narrow.toml"
    narrow.write_text("[model]\nhidden_size = 4\n[meta]\nmeta_batch_size = 2\n")
    code, out, err = _main(capsys, "bench", "--preset", "omniglot-mamlpp-5w1s", "--config", str(narrow),
                           "--iterations", "1", "--device", "cpu", "--json")
    assert code == 0, err
    bench = json.loads(out.strip().splitlines()[-1])
    assert bench["preset"] == "omniglot-mamlpp-5w1s"
    assert (bench["per_step_bn"], bench["strategy"]) == (True, "batched")
    assert bench["learned_inner_lr"] == "per-layer-per-step" and bench["multi_step_loss"]
    assert (bench["ways"], bench["inner_steps"], bench["meta_batch_size"]) == (5, 5, 2)


def test_keep_best_and_eval_ensemble_through_the_cli(tmp_path: Path, fake_data: None,
                                                     capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "kept"
    code, _out, err = _main(capsys, "train", *TINY, "--iterations", "4", "--eval-every", "1", "--set",
                            "run.keep_best=2", "--run-dir", str(run_dir))
    assert code == 0, err
    assert len(list((run_dir / "top").glob("iteration_*.pt"))) == 2
    code, out, err = _main(capsys, "eval", str(run_dir), "--ensemble", "2", "--json")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert "ensemble of the 2 best checkpoints" in out.splitlines()[0]
    assert result["ensemble_members"] == 2 and len(result["checkpoints"]) == 2
    assert json.loads((run_dir / "results.json").read_text())["ensembles"]["2"]["ensemble_test_accuracy"] == \
        result["ensemble_test_accuracy"]
    code, _out, err = _main(capsys, "eval", str(run_dir), "--ensemble", "3")
    assert code == 2 and "train with --set run.keep_best=3" in err and "Traceback" not in err
    code, _out, err = _main(capsys, "eval", str(run_dir), "--ensemble", "2", "--checkpoint", "latest")
    assert code == 2 and "drop --checkpoint latest" in err
    help_text = " ".join(_main(capsys, "eval", "--help")[1].split())
    assert "--ensemble K" in help_text and "softmax probabilities averaged" in help_text
    assert "run.keep_best" in " ".join(_main(capsys, "train", "--help")[1].split())


def test_resume_through_the_cli(tmp_path: Path, fake_data: None, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _main(capsys, "train", *TINY, "--iterations", "4", "--run-dir", str(reference))[0] == 0

    real, calls = loop.compute_meta_gradients, {"n": 0}

    def interrupt_at_3(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return real(*args)

    with monkeypatch.context() as mp:
        mp.setattr(loop, "compute_meta_gradients", interrupt_at_3)
        code, _out, err = _main(capsys, "train", *TINY, "--iterations", "4", "--run-dir", str(run_dir))
    assert code == 130
    assert f"interrupted: SIGINT received: stopped after iteration 3 and saved {run_dir / 'latest.pt'}" in err
    assert "Traceback" not in err

    code, _out, err = _main(capsys, "train", "--resume", "--run-dir", str(run_dir), "--device", "cpu")
    assert code == 0, err
    assert "resuming" in err
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert ours["test_accuracy"] == theirs["test_accuracy"] and ours["test_loss"] == theirs["test_loss"]
    strip = [{k: v for k, v in r.items() if k not in WALL_CLOCK_COLUMNS} for r in read_metrics(run_dir)]
    assert strip == [{k: v for k, v in r.items() if k not in WALL_CLOCK_COLUMNS} for r in
                     read_metrics(reference)]


def test_config_file_then_flags(tmp_path: Path, fake_data: None, capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "exp.toml"
    file.write_text('preset = "omniglot-anil-5w5s"\n[meta]\niterations = 2\ninner_lr = 0.3\n')
    code, _out, err = _main(capsys, "train", "--config", str(file), *TINY, "--inner-lr", "0.2",
                           "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["preset"] == "omniglot-anil-5w5s" and config["meta"]["algorithm"] == "anil"
    assert config["meta"]["iterations"] == 2 and config["meta"]["inner_lr"] == 0.2
    assert config["data"]["shots"] == 1  # the flag beats the preset's 5


BAD_TRAIN_ARGS = [
    (["--preset", "omniglot-maml-5w3s"], ("error: unknown preset 'omniglot-maml-5w3s'; valid presets: "
                                          "cifar-fs-anil-5w1s, ")),
    (["--inner-lr", "0"], "error: meta.inner_lr (--inner-lr) must be positive, got 0.0"),
    (["--inner-lr", "-0.1"], "error: meta.inner_lr (--inner-lr) must be positive, got -0.1"),
    (["--meta-lr", "0"], "error: meta.meta_lr (--meta-lr) must be positive"),
    (["--inner-steps", "0"], "error: meta.inner_steps (--inner-steps) must be positive"),
    (["--test-inner-steps", "-1"], "error: meta.test_inner_steps (--test-inner-steps) must be positive"),
    (["--ways", "0"], "error: data.ways (--ways) must be positive"),
    (["--shots", "0"], "error: data.shots (--shots) must be positive"),
    (["--query-shots", "-2"], "error: data.query_shots (--query-shots) must be positive"),
    (["--iterations", "0"], "error: meta.iterations (--iterations) must be positive"),
    (["--meta-batch-size", "0"], "error: meta.meta_batch_size (--meta-batch-size) must be positive"),
    (["--eval-every", "0"], "error: run.eval_every (--eval-every) must be positive"),
    (["--checkpoint-every", "0"], "error: run.checkpoint_every (--checkpoint-every) must be positive"),
    (["--test-tasks", "1"], "error: run.test_tasks (--test-tasks) must be at least 2"),
    (["--device", "tpu"], "error: unknown device 'tpu'"),
    (["--algorithm", "imaml"],
     f"error: unknown algorithm 'imaml'; valid algorithms: {', '.join(ALGORITHMS)}"),
    (["--set", "meta.inner_lrr=0.1"], "error: unknown setting meta.inner_lrr"),
    (["--set", "inner_lr"], "error: --set expects SECTION.KEY=VALUE"),
    (["--config", "/nonexistent/exp.toml"], "error: cannot read config file /nonexistent/exp.toml"),
    (["--resume"], "error: no run to resume in "),
    (["--ways", "11"], "error: ways=11 but split 'train' of tiny has only 10 classes"),
    (["--ways", "1"], "error: ways=1: a classification task needs at least 2 classes"),
    (["--shots", "10", "--query-shots", "11"], "error: shots + query_shots = 10 + 11 = 21"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_TRAIN_ARGS)
def test_bad_configuration_exits_2_with_one_message(
    tmp_path: Path, fake_data: None, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    run_dir = tmp_path / "run"
    code, _out, err = _main(capsys, "train", "--device", "cpu", "--run-dir", str(run_dir), *argv)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert not run_dir.exists()  # nothing written


def test_the_thread_count_is_decided_once_from_metagrad_threads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.THREADS_VAR == "METAGRAD_THREADS"
    torch.set_num_threads(2)
    monkeypatch.setenv(cli.THREADS_VAR, " 1 ")
    cli.tune_compute_process()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.delenv(cli.THREADS_VAR)
    cli.tune_compute_process()
    assert torch.get_num_threads() == 2  # unset: torch's own count is left as it is
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv(cli.THREADS_VAR, bad)
        code, _out, err = _main(capsys, "train", "--device", "cpu", "--run-dir", str(tmp_path / "run"))
        assert code == 2 and "Traceback" not in err
        assert err == (f"error: METAGRAD_THREADS={bad!r} is not a positive number of threads; unset it for "
                       "torch's default\n")
        assert not (tmp_path / "run").exists()
    assert torch.get_num_threads() == 2


def test_resume_of_a_folder_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _main(capsys, "train", "--resume", "--run-dir", str(tmp_path))
    assert code == 2
    assert err == (f"error: no run to resume in {tmp_path} (it holds no config.json); start a new run with: "
                   f"metagrad train --run-dir {tmp_path}\n")


@pytest.mark.parametrize(
    "argv",
    [["train", "--bogus"], ["train", "--inner-lr", "abc"], ["train", "--seed", "1.5"], ["fly"], [],
     ["eval"], ["eval", "x", "--checkpoint", "first"], ["data"], ["data", "info"]],
)
def test_command_line_errors_exit_2(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    code, _out, err = _main(capsys, *argv)
    assert code == 2
    assert "usage: metagrad" in err and "Traceback" not in err


def test_help_documents_every_option_with_its_default(capsys: pytest.CaptureFixture) -> None:
    code, out, _err = _main(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())
    for option in ("--preset", "--config", "--data-dir", "--run-dir", "--device", "--seed", "--ways",
                   "--shots", "--query-shots", "--meta-batch-size", "--inner-lr", "--inner-steps",
                   "--test-inner-steps", "--meta-lr", "--iterations", "--first-order", "--eval-every",
                   "--test-tasks", "--checkpoint-every", "--resume"):
        assert option in text, option
    for default in ("omniglot-maml-5w1s: 0.4)", "omniglot-maml-5w1s: 60000)", "omniglot-maml-5w1s: 600)",
                    "else omniglot-maml-5w1s", "default: runs/<preset>-<timestamp>", "$METAGRAD_DATA"):
        assert default in text, default
    for command in ("eval", "plot", "results", "bench"):
        assert _main(capsys, command, "--help")[0] == 0


def test_help_reaches_every_config_setting(capsys: pytest.CaptureFixture) -> None:
    # Each setting has a flag or a line under "settings without a flag", with every value a registry allows.
    import dataclasses

    from metagrad.models import MODELS
    from metagrad.models.layers import NORM_INITS
    from metagrad.training.config import _SECTIONS, SPLIT_SCHEMES

    code, out, _err = _main(capsys, "train", "--help")
    assert code == 0
    epilog = out[out.index("settings without a flag"):]
    flagged = {key for _, key, _, _ in cli._TRAIN_OPTIONS} | {key for _, key, _ in cli._TRAIN_SWITCHES}
    flagged |= {"data.data_dir", "data.cache_dir", "run.run_dir", "run.device"}  # --data-dir ... --device
    for section, kind in _SECTIONS.items():
        for field in dataclasses.fields(kind):
            key = f"{section}.{field.name}"
            assert key in flagged or f"  {key} " in epilog, f"{key}: no flag and not under --set's settings"
    assert not flagged & {key for key, _ in cli._SET_ONLY}
    for value in [*MODELS, *NORM_INITS, *(s for schemes in SPLIT_SCHEMES.values() for s in schemes)]:
        assert value in epilog, value
    assert "model.norm_init    conv models: BatchNorm's scale starts U[0, 1) (learn2learn) or at 1 (ones) " \
           "(learn2learn)" in epilog


def test_eval_plot_results_of_missing_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _main(capsys, "eval", str(tmp_path)) == (
        2, "", f"error: {tmp_path} is not a run folder (it holds no config.json)\n")
    assert _main(capsys, "plot", str(tmp_path)) == (
        2, "", f"error: {tmp_path} holds no metrics.jsonl: is it a run folder?\n")
    assert _main(capsys, "results", str(tmp_path)) == (
        2, "", f"error: {tmp_path} holds no run folder (no config.json in it or its subfolders)\n")
    assert _main(capsys, "results", str(tmp_path / "nope"))[0] == 2


def test_results_reads_hand_made_and_partial_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shipped = Path(__file__).resolve().parents[1] / "results" / "omniglot-maml-5w1s"
    config = json.loads((shipped / "config.json").read_text())
    config["data"]["split_scheme"] = "maml"  # as runs trained before the presets took the papers' split
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    (heldout / "config.json").write_text(json.dumps(config))
    (heldout / "results.json").write_text(json.dumps(
        {"test_accuracy": 0.95, "test_ci95": 0.01, "iterations": 100, "iterations_planned": 60000}))
    config["data"]["split_scheme"] = "shuffled"  # now the preset's own settings
    run = tmp_path / "partial"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    (run / "results.json").write_text(json.dumps(
        {"test_accuracy": 0.929, "test_ci95": 0.0104, "iterations": 2251, "iterations_planned": 60000}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "results.json").write_text("{not json")
    code, out, err = _main(capsys, "results", str(tmp_path))
    assert code == 0 and err == ""
    finn = "98.7 +/- 0.4 (Finn et al. 2017, Table 1)"  # the preset's number: both configs are the preset's
    assert out.splitlines()[0].startswith("| run | preset | split | paper (%) | test accuracy")
    # A hand-made results.json that does not say how many test tasks: "?", not a guess.
    assert (f"| partial | omniglot-maml-5w1s | shuffled | {finn} | 92.90 ± 1.04 | ? | 2251/60000 | ? | ? |"
            in out)
    assert (f"| broken | omniglot-maml-5w1s | shuffled | {finn} | (unreadable results.json: JSONDecodeError"
            in out)
    assert ("| heldout | omniglot-maml-5w1s | maml | n/a: not the preset (data.split_scheme) "
            "| 95.00 ± 1.00 | ? |" in out)

    # A published results.json keeps the number it was compared with.
    (run / "results.json").write_text(json.dumps(
        {"test_accuracy": 0.929, "test_ci95": 0.0104, "iterations": 2251, "iterations_planned": 60000,
         "paper": "98.7 (as quoted when published)"}))
    code, out, err = _main(capsys, "results", str(tmp_path))
    assert ("| partial | omniglot-maml-5w1s | shuffled | 98.7 (as quoted when published) | 92.90 ± 1.04 |"
            in out)


def test_data_info_and_download(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                tmp_path: Path) -> None:
    from metagrad.data import datasets

    info = {"dataset": "omniglot", "image_shape": [1, 28, 28],
            "splits": {"train": {"classes": 1100, "images_per_class": 20},
                       "validation": {"classes": 100, "images_per_class": 20},
                       "test": {"classes": 423, "images_per_class": 20}},
            "root": str(tmp_path)}
    calls = []
    monkeypatch.setattr(datasets, "dataset_info", lambda name, **kw: calls.append((name, kw)) or info)
    monkeypatch.setattr(datasets, "download", lambda name, **kw: calls.append((name, kw)) or tmp_path / name)

    code, out, _err = _main(capsys, "data", "info", "omniglot", "--data-dir", "D", "--cache-dir", "C",
                           "--json")
    assert code == 0 and calls[-1] == ("omniglot", {"data_dir": "D", "cache_dir": "C"})
    assert json.loads(out.splitlines()[-1]) == info
    assert "image_shape: 1 x 28 x 28" in out and "train: 1100 classes, 20 images per class" in out
    code, out, _err = _main(capsys, "data", "info", "omniglot")
    assert code == 0 and not out.splitlines()[-1].startswith("{")
    code, out, _err = _main(capsys, "data", "download", "omniglot", "--data-dir", "D")
    assert code == 0 and out == f"{tmp_path / 'omniglot'}\n" and calls[-1] == ("omniglot", {"data_dir": "D"})
    code, out, _err = _main(capsys, "data", "info", "cub", "--split-scheme", "triantafillou")
    assert code == 0 and calls[-1] == ("cub", {"data_dir": None, "cache_dir": None,
                                               "split_scheme": "triantafillou"})


def test_data_info_counts_classes_of_unequal_sizes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from metagrad.data import cub

    builders = load_script("tests/data/data_builders.py")
    monkeypatch.setattr(cub, "OFFICIAL_COUNTS", builders.SMALL_CUB_COUNTS)
    builders.write_cub(tmp_path / "cub", as_tgz=False)
    code, out, err = _main(capsys, "data", "info", "cub", "--data-dir", str(tmp_path), "--cache-dir",
                           str(tmp_path / "cache"), "--json")
    assert code == 0, err
    assert "  train: 4 classes, 17 images, 4 min images per class, 5 max images per class" in out
    assert json.loads(out.splitlines()[-1])["splits"]["test"] == {"classes": 2, "images_per_class": 4}


def test_data_errors_are_one_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _out, err = _main(capsys, "data", "info", "cifar", "--data-dir", str(tmp_path))
    assert code == 2 and err.startswith("error: unknown dataset 'cifar'") and "Traceback" not in err
    code, _out, err = _main(capsys, "data", "info", "omniglot", "--data-dir", str(tmp_path / "empty"))
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err


def test_bench_calls_run_bench(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls = []
    fake = types.ModuleType("metagrad.bench")
    fake.run_bench = lambda config, **kwargs: calls.append((config, kwargs)) or {}
    monkeypatch.setitem(sys.modules, "metagrad.bench", fake)
    code, _out, err = _main(capsys, "bench", "--preset", "omniglot-anil-20w1s", "--iterations", "3",
                           "--device", "cpu", "--json")
    assert code == 0, err
    (config, kwargs), = calls
    assert config.preset == "omniglot-anil-20w1s" and config.run.device == "cpu"
    assert config.meta.tasks_per_chunk == 0  # automatic unless asked
    assert kwargs == {"iterations": 3, "json_output": True}
    code, _, err = _main(capsys, "bench", "--tasks-per-chunk", "1")
    assert code == 0, err
    assert calls[-1][0].meta.tasks_per_chunk == 1


def test_bench_without_its_module(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "metagrad.bench", None)  # makes the import fail
    code, _out, err = _main(capsys, "bench")
    assert code == 1 and err == "error: metagrad bench is not available: this installation has no " \
                                "metagrad.bench module\n"


def test_python_dash_m_metagrad(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "metagrad", "train", "--preset", "nope", "--run-dir",
                           str(tmp_path / "run")], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown preset 'nope'; valid presets: ")
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "metagrad", "--version"], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("metagrad ")


def test_every_argument_of_every_command_has_help() -> None:
    from metagrad.cli import build_parser

    def parsers(parser: argparse.ArgumentParser, name: str):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    missing = []
    for name, parser in parsers(build_parser(), "metagrad"):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # its commands are listed with their help
                missing += [f"{name} {a.dest}" for a in action._choices_actions if not a.help]
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name}: {action.dest}")
    assert missing == []


def test_presets_lists_every_preset_with_its_source_and_settings(capsys: pytest.CaptureFixture) -> None:
    from metagrad.training.config import list_presets

    code, out, err = _main(capsys, "presets")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[::2]] == list_presets()
    assert "omniglot-maml-5w1s  (Finn, Abbeel & Levine 2017)" in lines
    assert "omniglot-maml-5w1s-fast  (metagrad's own recipe)" in lines
    settings = lines[lines.index("omniglot-maml-5w1s  (Finn, Abbeel & Levine 2017)") + 1]
    assert settings == ("    omniglot 5-way 1-shot (1 query), maml, inner lr 0.4 x 1 (10 at test), "
                        "meta-batch 32, 60,000 iterations, omniglot-cnn")
    mamlpp = lines[lines.index("omniglot-mamlpp-5w1s  (Antoniou, Edwards & Storkey 2019)") + 1]
    assert "learned inner lr per-layer-per-step, per-step BatchNorm" in mamlpp
