"""The 95% confidence interval and the metric files a checkpoint cuts back on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metagrad.errors import FileError, TrainingError
from metagrad.training.metrics import COLUMNS, MetricsWriter, mean_ci95, read_metrics


def test_ci95_is_1_96_sample_std_over_sqrt_n() -> None:
    accs = torch.tensor([0.2, 0.4, 0.4, 1.0, 0.6])
    mean, ci95 = mean_ci95(accs)
    n = 5
    sample_std = math.sqrt(sum((a - 0.52) ** 2 for a in [0.2, 0.4, 0.4, 1.0, 0.6]) / (n - 1))  # ddof = 1
    assert mean == pytest.approx(0.52, abs=1e-7)
    assert ci95 == pytest.approx(1.96 * sample_std / math.sqrt(n), rel=1e-6)


def test_ci95_known_value() -> None:
    # std (ddof=1) of [0.5, 1, 1, 0.5] is sqrt(1/12); 1.96 * 0.288675 / 2 = 0.282902
    assert mean_ci95(torch.tensor([0.5, 1.0, 1.0, 0.5])) == pytest.approx((0.75, 0.2829016), abs=1e-6)


def test_ci95_of_constant_scores_is_zero() -> None:
    assert mean_ci95(torch.ones(600)) == (1.0, 0.0)


def test_ci95_needs_two_values() -> None:
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_ci95(torch.tensor([1.0]))


def test_writer_cuts_both_files_back_to_the_checkpoint(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 1, "split": "train", "loss": 1.5, "acc": 0.25, "sec_per_iter": 0.1,
                  "tasks_per_sec": 40.0, "lr": 0.001})
    offsets = writer.offsets()
    writer.write({"step": 2, "split": "train", "loss": 1.25, "acc": 0.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "spl')  # a line cut short by kill -9
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # the torn line is skipped

    MetricsWriter(tmp_path, offsets).close()
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "split": "train", "loss": 1.5, "acc": 0.25, "sec_per_iter": 0.1,
                     "tasks_per_sec": 40.0, "lr": 0.001}]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines == [",".join(COLUMNS), "1,train,1.5,0.25,0.1,40.0,0.001"]


def test_missing_values_are_null_and_empty(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 4, "split": "validation", "loss": 0.5, "acc": 0.75})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["sec_per_iter"] is None
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "4,validation,0.5,0.75,,,"


def test_metrics_shorter_than_the_checkpoint_says_is_an_error(tmp_path: Path) -> None:
    MetricsWriter(tmp_path).close()
    with pytest.raises(TrainingError, match="metrics.jsonl holds 0 bytes but the checkpoint recorded 100"):
        MetricsWriter(tmp_path, {"jsonl": 100, "csv": 10})


@pytest.mark.parametrize(
    "line",
    ['{"step": 3, "split": "tra', "not json at all", "[1, 2]",
     '{"step": "3", "split": "train", "loss": 1, "acc": 1}',
     '{"step": 3, "split": "train", "loss": null, "acc": 0.5}', b"\xff\xfe".decode("latin-1")],
)
def test_a_damaged_metrics_line_is_named(tmp_path: Path, line: str) -> None:
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 1, "split": "train", "loss": 1.0, "acc": 0.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="latin-1") as handle:
        handle.write(line + "\n")
    with pytest.raises(FileError, match=r"line 2 of .*metrics.jsonl is not a metric row|is not UTF-8 text"):
        read_metrics(tmp_path)
