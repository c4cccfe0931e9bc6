"""Task sampling of the compat layer's ``l2l.data.Taskset``: the tensor fast path against the per-sample path.

Both draw learn2learn's Omniglot benchmark pipeline (FusedNWaysKShots, LoadData, RemapLabels,
ConsecutiveLabels, RandomClassRotation) from an Omniglot-sized uint8 tensor (1623 x 20 x 1 x 28 x 28,
random pixels: no data needed). The per-sample path is forced by passing torch's ``default_collate``
explicitly. Rounds alternate between the two so that load from other processes hits both alike.

Usage: python benchmarks/bench_l2l_tasks.py [--ways 5 --samples 2 --tasks 300 --rounds 3]
Prints one JSON line: device, torch version, microseconds per task for each path and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import time

# Before torch, as metagrad's command does, so that idle OpenMP threads wait passively (metagrad/_openmp.py):
# with torch first, on cores busy with other work, the small tensor operations here ran 100x slower.
import metagrad  # noqa: F401

# isort: split
import torch
from torch.utils.data import default_collate

import metagrad.compat.learn2learn as l2l
from metagrad.data.datasets import FewShotDataset


def _taskset(dataset: l2l.data.MetaDataset, ways: int, samples: int, fast: bool) -> l2l.data.Taskset:
    transforms = [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=ways, k=samples, filter_labels=list(range(1100))),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
    ]
    collate = None if fast else default_collate
    taskset = l2l.data.Taskset(dataset, transforms, num_tasks=-1, task_collate=collate)
    assert (taskset._fast is not None) == fast
    return taskset


def _seconds_per_task(taskset: l2l.data.Taskset, tasks: int) -> float:
    start = time.perf_counter()
    for _ in range(tasks):
        taskset.sample()
    return (time.perf_counter() - start) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5, help="classes per task")
    parser.add_argument("--samples", type=int, default=2, help="images per class per task")
    parser.add_argument("--tasks", type=int, default=300, help="tasks timed per round and path")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best is reported")
    args = parser.parse_args()
    random.seed(0)
    images = torch.randint(0, 256, (1623, 20, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    dataset = l2l.data.MetaDataset(FewShotDataset("omniglot-sized", "all", images))
    paths = {"fast": _taskset(dataset, args.ways, args.samples, True),
             "per_sample": _taskset(dataset, args.ways, args.samples, False)}
    best = {name: float("inf") for name in paths}
    for name, taskset in paths.items():  # warm-up
        _seconds_per_task(taskset, 10)
    for _ in range(args.rounds):
        for name, taskset in paths.items():
            best[name] = min(best[name], _seconds_per_task(taskset, args.tasks))
    print(json.dumps({
        "benchmark": "l2l_taskset", "device": "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ways": args.ways, "samples": args.samples,
        "us_per_task_fast": round(best["fast"] * 1e6, 1),
        "us_per_task_per_sample": round(best["per_sample"] * 1e6, 1),
        "speedup": round(best["per_sample"] / best["fast"], 2),
    }))


if __name__ == "__main__":
    main()
