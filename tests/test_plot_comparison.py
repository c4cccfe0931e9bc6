"""``metagrad plot RUN RUN ...``: runs overlaid, labelled by preset and changed settings, against iterations
and training time. Run folders are written by hand (config.json, metrics.jsonl): no training needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from metagrad.cli import main
from metagrad.errors import ConfigError
from metagrad.plot import _validation_curve, plot_comparison, run_labels
from metagrad.training.config import resolve_config, save_config


def _make_run(folder: Path, overrides: dict[str, Any], rows: list[dict[str, Any]] | None = None,
              preset: str = "omniglot-maml-5w1s") -> Path:
    folder.mkdir(parents=True)
    save_config(resolve_config(preset=preset, overrides=overrides), folder / "config.json")
    if rows is None:
        rows, seconds = [], 0.0
        for step in range(1, 11):
            seconds += 0.5
            rows.append({"step": step, "split": "train", "loss": 1.0, "acc": 0.5, "sec_per_iter": 0.5,
                         "train_seconds": seconds})
            if step % 5 == 0:
                rows.append({"step": step, "split": "validation", "loss": 1.0, "acc": 0.4 + step / 50,
                             "acc_ci95": 0.02, "train_seconds": seconds})
        rows.append({"step": 10, "split": "test", "loss": 1.0, "acc": 0.61, "acc_ci95": 0.01})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_labels_name_the_preset_and_what_each_run_changed(tmp_path: Path) -> None:
    common = {"meta.iterations": 2000, "data.data_dir": str(tmp_path), "run.checkpoint_every": 7}
    a = _make_run(tmp_path / "a", {**common, "meta.inner_lr": 0.1, "run.seed": 1})
    b = _make_run(tmp_path / "b", common)
    c = _make_run(tmp_path / "c", {**common, "data.shots": 5, "data.query_shots": 5},
                  preset="omniglot-anil-5w1s")
    labels, note = run_labels([a, b, c])
    # folders and checkpoint frequency never label a run; iterations=2000 is every run's: the note
    assert labels == ["omniglot-maml-5w1s: inner_lr=0.1, seed=1", "omniglot-maml-5w1s",
                      "omniglot-anil-5w1s: query_shots=5, shots=5"]
    assert note == "iterations=2000"


def test_equal_labels_get_the_folder_name_and_a_folder_without_config_its_name(tmp_path: Path) -> None:
    a = _make_run(tmp_path / "first", {"run.device": "cpu"})
    b = _make_run(tmp_path / "second", {"run.device": "cpu"})
    bare = tmp_path / "bare"
    bare.mkdir()
    assert run_labels([a, b, bare]) == (
        ["omniglot-maml-5w1s (first)", "omniglot-maml-5w1s (second)", "bare"], "device=cpu")


def test_training_seconds_of_runs_written_before_the_column(tmp_path: Path) -> None:
    # No train_seconds: the train rows' sec_per_iter add up to it (evaluation rows add nothing).
    rows = [{"step": 1, "split": "train", "loss": 1.0, "acc": 0.5, "sec_per_iter": 2.0},
            {"step": 1, "split": "validation", "loss": 1.0, "acc": 0.5, "tasks_per_sec": 100.0},
            {"step": 2, "split": "train", "loss": 1.0, "acc": 0.5, "sec_per_iter": 3.0},
            {"step": 2, "split": "validation", "loss": 1.0, "acc": 0.6}]
    validation, test = _validation_curve(_make_run(tmp_path / "old", {}, rows))
    assert [r["train_seconds"] for r in validation] == [2.0, 5.0] and test is None


def test_plot_several_runs_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    runs = [str(_make_run(tmp_path / name, {"meta.inner_lr": lr})) for name, lr in (("a", 0.1), ("b", 0.4))]
    monkeypatch.chdir(tmp_path)
    assert main(["plot", *runs]) == 0
    assert capsys.readouterr().out.strip() == "comparison.png"  # in the current folder
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000
    assert main(["plot", *runs, "--output", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().startswith("<?xml")


def test_a_run_without_validation_rows_is_named(tmp_path: Path) -> None:
    ready = _make_run(tmp_path / "ready", {})
    young = _make_run(tmp_path / "young", {}, [{"step": 1, "split": "train", "loss": 1.0, "acc": 0.5}])
    with pytest.raises(ConfigError, match="young/metrics.jsonl has no validation row yet"):
        plot_comparison([ready, young], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="holds no metrics.jsonl"):
        plot_comparison([ready, tmp_path], tmp_path / "x.png")
