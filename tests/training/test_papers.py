"""The published numbers beside each preset, and when a run no longer is its preset."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from metagrad.training.config import config_to_dict, list_presets, load_preset
from metagrad.training.papers import PUBLISHED, preset_differences, published_for
from metagrad.training.report import find_runs, results_table


def test_every_packaged_preset_has_its_number_and_no_other_name_does() -> None:
    assert set(PUBLISHED) == set(list_presets())


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_the_preset_file_quotes_the_same_number(preset: str) -> None:
    number = PUBLISHED[preset]
    text = (resources.files("metagrad") / "configs" / f"{preset}.toml").read_text(encoding="utf-8")
    if number.startswith("none published"):
        reason = re.fullmatch(r"none published \((.+)\)", number).group(1)
        comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        assert reason in comment
    else:
        mean_and_spread = re.match(r"^(\d+\.\d+(?: \+/- \d+\.\d+)?) \(", number).group(1)
        assert f"{mean_and_spread} %" in text


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_an_unchanged_preset_gets_its_number(preset: str) -> None:
    assert published_for(load_preset(preset)) == PUBLISHED[preset]
    assert preset_differences(load_preset(preset)) == []


def test_where_the_data_is_how_far_it_trained_and_how_gradients_are_batched_do_not_matter() -> None:
    config = load_preset("omniglot-maml-5w1s")
    same = replace(config, data=replace(config.data, data_dir="/elsewhere", cache_dir="/tmp/x"),
                   meta=replace(config.meta, iterations=100, vectorize=False, tasks_per_chunk=1),
                   run=replace(config.run, seed=7, device="cpu", eval_every=10))
    assert published_for(same) == "98.7 +/- 0.4 (Finn et al. 2017, Table 1)"


def test_a_changed_setting_makes_another_experiment() -> None:
    config = load_preset("omniglot-maml-5w1s")
    other = replace(config, data=replace(config.data, ways=20), meta=replace(config.meta, inner_lr=2.0))
    assert preset_differences(other) == ["data.ways", "meta.inner_lr"]
    assert published_for(other) == ""


def test_a_config_of_no_packaged_preset_has_no_number() -> None:
    mine = replace(load_preset("omniglot-maml-5w1s"), preset="my-experiment")
    assert published_for(mine) == "" and preset_differences(mine) == []


def _fake_run(folder: Path, config: dict, test_tasks: int = 600) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "results.json").write_text(json.dumps(
        {"test_accuracy": 0.9812, "test_ci95": 0.0043, "test_tasks": test_tasks, "iterations": 500,
         "wall_time_s": 61.0, "device": "cpu"}
    ), encoding="utf-8")


def test_results_table_shows_the_papers_number_beside_a_run_of_the_preset(tmp_path: Path) -> None:
    config = config_to_dict(load_preset("omniglot-fomaml-5w1s"))
    _fake_run(tmp_path / "runs" / "as-packaged", config)
    changed = json.loads(json.dumps(config))
    changed["meta"]["inner_lr"] = 0.1
    _fake_run(tmp_path / "runs" / "changed", changed)
    lines = results_table(find_runs([tmp_path / "runs"])).splitlines()
    assert lines[0].startswith("| run | preset | split | paper (%) | test accuracy (%) ± 95% CI "
                               "| test tasks |")
    assert lines[2].startswith("| as-packaged | omniglot-fomaml-5w1s | shuffled | 98.3 +/- 0.5 "
                               "(Nichol et al. 2018, Table 1) | 98.12 ± 0.43 | 600 | 500 |")
    assert lines[3].startswith("| changed | omniglot-fomaml-5w1s | shuffled | n/a: not the preset "
                               "(meta.inner_lr) | 98.12")


def test_results_table_says_which_split_and_how_many_tasks_each_number_is_on(tmp_path: Path) -> None:
    # The same preset tested on the held-out-alphabet split, or on 20 tasks, is not the same number.
    config = config_to_dict(load_preset("omniglot-maml-5w1s"))
    old_split = json.loads(json.dumps(config))
    old_split["data"]["split_scheme"] = "maml"
    _fake_run(tmp_path / "runs" / "a-maml-split", old_split)
    _fake_run(tmp_path / "runs" / "b-few-tasks", config, test_tasks=20)
    lines = results_table(find_runs([tmp_path / "runs"])).splitlines()
    assert lines[2].startswith("| a-maml-split | omniglot-maml-5w1s | maml | n/a: not the preset "
                               "(data.split_scheme) | 98.12 ± 0.43 | 600 |")
    assert lines[3].startswith("| b-few-tasks | omniglot-maml-5w1s | shuffled | 98.7 +/- 0.4 "
                               "(Finn et al. 2017, Table 1) | 98.12 ± 0.43 | 20 |")


def test_results_table_has_no_paper_column_when_no_run_has_a_number(tmp_path: Path) -> None:
    config = config_to_dict(load_preset("omniglot-maml-5w1s"))
    config["meta"]["inner_lr"] = 0.1
    _fake_run(tmp_path / "runs" / "changed", config)
    assert "paper" not in results_table(find_runs([tmp_path / "runs"])).splitlines()[0]
