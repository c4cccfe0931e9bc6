"""The published numbers in results/ reproduce: each shipped best.pt, meta-tested again on the real
Omniglot test split (same 600 tasks, on the CPU), gives the accuracy its results.json reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from metagrad.training import evaluate_checkpoint

RESULTS = Path(__file__).resolve().parents[2] / "results"
SHIPPED = sorted(p for p in RESULTS.iterdir() if (p / "best.pt").is_file()) if RESULTS.is_dir() else []


def test_every_result_ships_what_the_readme_promises() -> None:
    assert SHIPPED, f"no results/<preset>/best.pt under {RESULTS}"
    for folder in SHIPPED:
        results = json.loads((folder / "results.json").read_text())
        assert results["preset"] == folder.name
        assert results["test_tasks"] == 600 and 0 < results["test_ci95"] < results["test_accuracy"] <= 1
        assert (folder / "config.json").is_file() and (folder / "learning_curves.png").is_file()
        assert (folder / "best.pt").stat().st_size < 1 << 20  # an Omniglot CNN is well under 1 MB


@pytest.mark.slow
@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoint_reproduces_its_result(folder: Path, real_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / folder.name  # a copy: evaluating writes eval_best.json beside the checkpoint
    shutil.copytree(folder, run_dir)
    results = json.loads((folder / "results.json").read_text())
    evaluation = evaluate_checkpoint(run_dir, data_dir=str(real_data), device="cpu")
    assert evaluation["checkpoint_iteration"] == results["checkpoint_iteration"]
    assert evaluation["test_tasks"] == results["test_tasks"]
    # The same tasks; a run trained on a GPU may flip a prediction or two on the CPU (1/3000 each).
    assert evaluation["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=2e-3)
    assert evaluation["test_ci95"] == pytest.approx(results["test_ci95"], abs=1e-3)
