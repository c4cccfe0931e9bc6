"""tools/publish_result.py: a run folder becomes results/<preset>/ without any number typed by hand."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from repo_scripts import load_script


def _tool() -> ModuleType:
    return load_script("tools/publish_result.py")


def _run(tmp_path: Path, accuracy: float, iterations: int) -> Path:
    run = tmp_path / f"run-{iterations}"
    run.mkdir()
    evaluation = {"preset": "omniglot-maml-5w1s", "test_accuracy": accuracy, "test_ci95": 0.007,
                  "iterations": iterations, "training_wall_time_s": 123.0, "status": "partial"}
    (run / "eval_best.json").write_text(json.dumps(evaluation))
    (run / "config.json").write_text(json.dumps({"preset": "omniglot-maml-5w1s"}))
    rows = [{"step": 1, "split": "train", "loss": 1.234567, "acc": 0.5, "sec_per_iter": 3.0},
            {"step": 2, "split": "train", "loss": 1.0, "acc": 0.6, "sec_per_iter": 1.0},
            {"step": 2, "split": "validation", "loss": 0.9, "acc": 0.7, "sec_per_iter": None},
            {"step": 3, "split": "train", "loss": 0.8, "acc": 0.123456, "sec_per_iter": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "best.pt").write_bytes(b"checkpoint")
    return run


def test_publish_writes_results_and_remembers_the_previous_number(tmp_path: Path) -> None:
    tool = _tool()
    results = tmp_path / "results"
    target = tool.publish(_run(tmp_path, 0.95, 1000), results, device="cpu: test", command="metagrad train X")
    data = json.loads((target / "results.json").read_text())
    assert target == results / "omniglot-maml-5w1s"
    assert (data["test_accuracy"], data["iterations"], data["device"]) == (0.95, 1000, "cpu: test")
    assert data["sec_per_iter_median"] == 2.0  # training rows only
    assert data["wall_time_s"] == 123.0 and data["command"] == "metagrad train X"
    assert data["paper"].startswith("98.7 +/- 0.4") and data["previous"] is None
    assert (target / "best.pt").read_bytes() == b"checkpoint"
    assert sorted(p.name for p in target.iterdir()) == [
        "best.pt", "config.json", "learning_curves.png", "metrics.jsonl", "results.json"]
    kept = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    assert kept[0] == {"step": 1, "split": "train", "loss": 1.235, "acc": 0.5} and kept[3]["acc"] == 0.1235
    assert (target / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"  # re-drawn from the kept rows

    tool.publish(_run(tmp_path, 0.97, 5000), results, device="cpu: test", command="metagrad train X")
    data = json.loads((target / "results.json").read_text())
    assert data["test_accuracy"] == 0.97
    assert data["previous"].startswith("replaces 95.00 +/- 0.70 after 1000 iterations on cpu: test")


def test_publish_says_when_the_number_it_replaces_was_on_another_split(tmp_path: Path) -> None:
    tool, results = _tool(), tmp_path / "results"

    def run_on(split: str, accuracy: float, iterations: int) -> Path:
        run = _run(tmp_path, accuracy, iterations)
        config = {"preset": "omniglot-maml-5w1s", "data": {"dataset": "omniglot", "split_scheme": split}}
        (run / "config.json").write_text(json.dumps(config))
        return run

    tool.publish(run_on("maml", 0.95, 1000), results, device="cpu: test", command="c")
    target = tool.publish(run_on("shuffled", 0.97, 2000), results, device="cpu: test", command="c")
    data = json.loads((target / "results.json").read_text())
    assert data["previous"] == ("replaces 95.00 +/- 0.70 after 1000 iterations on cpu: test, on the maml "
                                "split (this one: shuffled); see git history")
    tool.publish(run_on("shuffled", 0.98, 3000), results, device="cpu: test", command="c")
    data = json.loads((target / "results.json").read_text())
    assert data["previous"] == "replaces 97.00 +/- 0.70 after 2000 iterations on cpu: test; see git history"


def test_publish_refuses_a_run_that_was_not_evaluated(tmp_path: Path) -> None:
    run = _run(tmp_path, 0.9, 10)
    (run / "eval_best.json").unlink()
    with pytest.raises(SystemExit, match="metagrad eval"):
        _tool().publish(run, tmp_path / "results", device="d", command="c")


def test_publish_refuses_a_run_without_its_metrics(tmp_path: Path) -> None:
    run = _run(tmp_path, 0.9, 10)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(SystemExit, match="lacks metrics.jsonl"):
        _tool().publish(run, tmp_path / "results", device="d", command="c")


def test_publish_drops_the_training_machines_data_folders(tmp_path: Path) -> None:
    run = _run(tmp_path, 0.9, 10)
    config = {"preset": "omniglot-maml-5w1s",
              "data": {"dataset": "omniglot", "data_dir": "/home/trainer/data", "cache_dir": "/tmp/c",
                       "ways": 5}}
    (run / "config.json").write_text(json.dumps(config))
    target = _tool().publish(run, tmp_path / "results", device="d", command="c")
    published = json.loads((target / "config.json").read_text())
    assert published["data"] == {"dataset": "omniglot", "data_dir": None, "cache_dir": None, "ways": 5}
    assert published["preset"] == "omniglot-maml-5w1s"
