"""The 95% confidence interval and the metric files a checkpoint cuts back on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metagrad.errors import FileError, TrainingError
from metagrad.training.metrics import (
    COLUMNS,
    MetricsWriter,
    gradient_norm,
    mean_ci95,
    rate_columns,
    rate_values,
    read_metrics,
)


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

    resumed = MetricsWriter(tmp_path, offsets)
    assert [r["step"] for r in resumed.kept] == [1]  # the rows the checkpoint saw
    resumed.close()
    rows = read_metrics(tmp_path)
    assert rows == [{**dict.fromkeys(COLUMNS), "step": 1, "split": "train", "loss": 1.5, "acc": 0.25,
                     "sec_per_iter": 0.1, "train_seconds": 0.1, "tasks_per_sec": 40.0, "lr": 0.001}]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines == [",".join(COLUMNS), "1,train,1.5,0.25,,0.1,0.1,40.0,0.001,,"]


def test_missing_values_are_null_and_empty(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 4, "split": "test", "loss": 0.5, "acc": 0.75})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["sec_per_iter"] is None
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "4,test,0.5,0.75,,,,,,,"


def test_train_seconds_add_up_the_training_steps_over_a_resume(tmp_path: Path) -> None:
    # Training time alone: validation rows carry the sum so far and add nothing to it.
    writer = MetricsWriter(tmp_path)
    for step, split, seconds in ((1, "train", 0.5), (2, "train", 0.25), (2, "validation", None)):
        writer.write({"step": step, "split": split, "loss": 1.0, "acc": 0.5, "sec_per_iter": seconds})
    offsets = writer.offsets()
    writer.write({"step": 3, "split": "train", "loss": 1.0, "acc": 0.5, "sec_per_iter": 9.0})  # lost
    writer.close()
    writer = MetricsWriter(tmp_path, offsets)
    writer.write({"step": 3, "split": "train", "loss": 1.0, "acc": 0.5, "sec_per_iter": 0.125})
    writer.close()
    assert [r["train_seconds"] for r in read_metrics(tmp_path)] == [0.5, 0.75, 0.75, 0.875]


def test_a_resumed_csv_keeps_its_own_header(tmp_path: Path) -> None:
    # A run started before a column existed: the CSV goes on with its header's columns, the JSON has all.
    (tmp_path / "metrics.csv").write_text("step,split,loss,acc,sec_per_iter,tasks_per_sec,lr\n")
    old = {"step": 1, "split": "train", "loss": 1.0, "acc": 0.5, "sec_per_iter": 0.5, "tasks_per_sec": 8.0,
           "lr": 0.001}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    writer = MetricsWriter(tmp_path, {"jsonl": (tmp_path / "metrics.jsonl").stat().st_size,
                                      "csv": (tmp_path / "metrics.csv").stat().st_size})
    assert writer.train_seconds == 0.5  # from sec_per_iter: the old rows have no train_seconds
    writer.write({**old, "step": 2, "grad_norm": 3.0})
    writer.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "2,train,1.0,0.5,0.5,8.0,0.001"
    assert read_metrics(tmp_path)[1]["grad_norm"] == 3.0 and read_metrics(tmp_path)[1]["train_seconds"] == 1.0


def test_extra_columns_and_mirrors(tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.closed = False

        def log(self, row: dict) -> None:
            self.rows.append(row)

        def flush(self) -> None:
            self.flushed = len(self.rows)

        def close(self) -> None:
            self.closed = True

    writer = MetricsWriter(tmp_path, columns=(*COLUMNS, "inner_lr.w"))
    recorder = Recorder()
    writer.mirror([recorder])
    writer.write({"step": 1, "split": "train", "loss": 1.0, "acc": 0.5, "inner_lr.w": 0.25})
    writer.offsets()  # a checkpoint: the mirrors are flushed too
    assert recorder.flushed == 1
    writer.close()
    assert recorder.closed and recorder.rows == read_metrics(tmp_path)
    assert recorder.rows[0]["inner_lr.w"] == 0.25
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].endswith(",peak_mem_mb,inner_lr.w")


def test_gradient_norm_and_rate_values() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert gradient_norm({"a": a, "b": b, "frozen": torch.zeros(1)}) == 5.0
    rates = {"w": torch.tensor([0.1, 0.3], requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    assert rate_columns(rates) == ("inner_lr.w", "inner_lr.b")
    assert rate_values(rates) == pytest.approx({"inner_lr.w": 0.2, "inner_lr.b": 0.5})
    assert rate_values({}) == {}


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


def test_a_runs_grad_norm_is_its_first_meta_gradients_norm(tmp_path: Path, fake_data: list) -> None:
    # Iteration 1's meta-gradient again, outside the loop: the same initialization and the same tasks.
    from tiny_run import tiny_config

    from metagrad.data.episodes import task_generator
    from metagrad.training.loop import compute_meta_gradients, run
    from metagrad.training.setup import prepare

    config = tiny_config(tmp_path / "run", **{"meta.iterations": 1, "meta.learned_inner_lr": "per-parameter"})
    run(config, quiet=True)
    first = read_metrics(tmp_path / "run")[0]
    prepared = prepare(config, torch.device("cpu"), ("train",), init_seed=config.run.seed)
    generator = task_generator(config.run.seed, "train")
    episode = prepared.samplers["train"].sample(config.meta.meta_batch_size, generator)
    _, grad_sum = compute_meta_gradients(prepared.learner, episode, config.meta)
    expected = (grad_sum / config.meta.meta_batch_size).norm().item()  # parameters' and rates' gradients
    assert first["grad_norm"] == pytest.approx(expected, rel=1e-5)
    saved = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["inner_lrs"]  # after the step
    assert {f"inner_lr.{name}": rate.mean().item() for name, rate in saved.items()} == {
        key: value for key, value in first.items() if key.startswith("inner_lr.")}
