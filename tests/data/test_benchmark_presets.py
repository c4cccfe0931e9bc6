"""Each new benchmark trains through the command as a new user would: a preset, the data in its folder,
a few iterations (task shapes and network width shrunk to the small fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_builders import write_cifarfs, write_cub, write_fc100, write_tiered

from metagrad import cli

pytestmark = pytest.mark.usefixtures("small_benchmark_counts")

SMALL = {"data.ways": 2, "data.shots": 1, "data.query_shots": 2, "meta.iterations": 2,
         "meta.meta_batch_size": 2, "run.eval_every": 1, "run.eval_tasks": 2, "run.test_tasks": 2,
         "model.hidden_size": 4}


@pytest.mark.parametrize(("preset", "write"), [
    ("cifar-fs-maml-5w1s", lambda data: write_cifarfs(data / "cifarfs", as_zip=False)),
    ("fc100-anil-5w5s", lambda data: write_fc100(data, as_zip=True)),
    ("tiered-imagenet-anil-5w1s", lambda data: write_tiered(data / "tiered-imagenet")),
    ("cub-maml-5w5s", lambda data: write_cub(data / "cubirds200", as_tgz=False)),
])
def test_preset_trains_on_its_data(tmp_path: Path, capsys: pytest.CaptureFixture, preset: str, write) -> None:
    write(tmp_path / "data")
    overrides = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
    code = cli.main(["train", "--preset", preset, "--data-dir", str(tmp_path / "data"),
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                     "--run-dir", str(tmp_path / "run"), *overrides])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["test_tasks"] == 2 and 0 <= result["test_accuracy"] <= 1
