"""Two ``metagrad train`` runs of one config write the same numbers, whatever else the machine runs.

The command decides its thread count and OpenMP setting once, at start, from its environment alone;
nothing in the loops looks at the machine's load. So a neighbour process started between two runs (or
during one) changes their speed, never their losses, accuracies or results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# wall-clock columns, the process's peak memory and the folder: what a run measures of its machine
WALL_CLOCK = ("sec_per_iter", "tasks_per_sec", "train_seconds", "wall_time_s", "training_wall_time_s",
              "peak_mem_mb", "run_dir")

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    sum(range(10000))\n"


def _train(run_dir: Path, data: Path, cache: Path) -> tuple[list[dict], dict]:
    subprocess.run([sys.executable, "-m", "metagrad", "train", "--data-dir", str(data), "--cache-dir",
                    str(cache), "--run-dir", str(run_dir), "--quiet", "--set", "meta.iterations=12",
                    "--set", "run.eval_every=6", "--set", "run.eval_tasks=10", "--set", "run.test_tasks=20"],
                   check=True, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    strip = lambda d: {k: v for k, v in d.items() if k not in WALL_CLOCK}
    return [strip(r) for r in rows], strip(results)


@pytest.mark.slow
def test_two_default_trainings_match_with_a_neighbour_started_between(real_data: Path,
                                                                      tmp_path: Path) -> None:
    first = _train(tmp_path / "a", real_data, tmp_path / "cache")
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        second = _train(tmp_path / "b", real_data, tmp_path / "cache")
    finally:
        neighbour.kill()
        neighbour.wait()
    assert first[0] == second[0]
    assert first[1] == second[1]
