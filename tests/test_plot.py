"""``metagrad plot``: a run's learning curves, smoothed without lag, with inner steps and the test mark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metagrad.plot import _centred_mean, plot_run


def test_the_centred_mean_does_not_lag() -> None:
    ramp = [float(i) for i in range(200)]
    assert _centred_mean(ramp, 51) == pytest.approx(ramp)  # a trailing mean of 51 sits 25 rows behind
    spike = _centred_mean([0.0] * 5 + [10.0] + [0.0] * 5, 5)
    assert spike[5] == pytest.approx(2.0) and spike[3:8] == pytest.approx([2.0] * 5)  # spread both ways
    assert spike[:3] == spike[8:] == [0.0, 0.0, 0.0]


def _run_folder(path: Path, *, test_row: bool) -> Path:
    path.mkdir()
    rows = [{"step": i, "split": "train", "loss": 2.0 - i / 100, "acc": i / 200} for i in range(1, 101)]
    rows += [{"step": i, "split": "validation", "loss": 1.0, "acc": 0.6} for i in (50, 100)]
    if test_row:
        rows.append({"step": 50, "split": "test", "loss": 0.9, "acc": 0.7})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text(json.dumps({"preset": "omniglot-maml-5w1s",
                                                  "meta": {"inner_steps": 1, "test_inner_steps": 10}}))
    return path


def _legends(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> list[list[str]]:
    from matplotlib.figure import Figure

    seen: list[list[str]] = []
    save = Figure.savefig

    def savefig(self: Figure, *args, **kwargs):  # read the legends of the figure being written
        seen.extend([t.get_text() for t in ax.get_legend().get_texts()] for ax in self.axes)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert plot_run(run_dir).stat().st_size > 10_000
    return seen


def test_the_legend_names_inner_steps_and_the_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    legends = _legends(monkeypatch, _run_folder(tmp_path / "run", test_row=True))
    assert len(legends) == 2 and legends[0] == legends[1]
    assert legends[0] == ["train, 1 inner step (each meta-batch)", "train, centred mean of 11 iterations",
                          "validation, 10 inner steps", "test, 10 inner steps (iteration 50)"]


def test_an_evaluated_unfinished_run_gets_its_test_mark(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # No test row (stopped before the meta-test), but `metagrad eval` wrote eval_best.json, as a
    # published results/<preset> holds results.json.
    run_dir = _run_folder(tmp_path / "run", test_row=False)
    (run_dir / "eval_best.json").write_text(json.dumps({"checkpoint_iteration": 100, "test_accuracy": 0.8,
                                                        "test_loss": 0.5, "test_inner_steps": 20}))
    assert _legends(monkeypatch, run_dir)[0][-1] == "test, 20 inner steps (iteration 100)"
