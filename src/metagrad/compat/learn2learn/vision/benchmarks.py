"""``l2l.vision.benchmarks.get_tasksets``: learn2learn's task sets over metagrad's datasets.

Each split's ``sample()`` returns one task as learn2learn does: ``(data, labels)`` with
``ways * samples`` items, the samples of each class consecutive, so learn2learn's examples (which
split support and query by even and odd positions) work unchanged. Tasks are drawn with a
``torch.Generator`` seeded from torch's global generator when the task set is made, so
``torch.manual_seed`` before ``get_tasksets`` reproduces them (learn2learn uses Python's ``random``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad.data import datasets
from metagrad.data.datasets import FewShotDataset
from metagrad.errors import ConfigError

__all__ = ["BenchmarkTasksets", "TaskSet", "get_tasksets", "list_tasksets"]

SPLITS = ("train", "validation", "test")
BENCHMARKS = ("omniglot", "mini-imagenet")


class TaskSet:
    """Few-shot tasks from one dataset split (learn2learn's ``TaskDataset``).

    Args:
        dataset: the split's images, (classes, images_per_class, C, H, W) uint8.
        ways: classes per task.
        samples: images per class per task (support and query together).
        num_tasks: -1 draws a fresh task on every ``sample()``; a positive number fixes a pool of that
            many tasks (task ``i`` is always the same) and ``sample()`` picks one of them.
        device: where the images are kept and tasks are returned.
        seed: seeds this task set's generator; None draws it from torch's global generator.

    Raises:
        ConfigError: the split has fewer than ``ways`` classes or ``samples`` images per class.
    """

    def __init__(self, dataset: FewShotDataset, ways: int, samples: int, num_tasks: int = -1,
                 device: torch.device | str | None = None, seed: int | None = None) -> None:
        if ways < 1 or samples < 1:
            raise ConfigError(f"ways and samples must be positive, got ways={ways} samples={samples}")
        if ways > dataset.num_classes:
            raise ConfigError(
                f"ways={ways} but split {dataset.split!r} has only {dataset.num_classes} classes"
            )
        if samples > dataset.images_per_class:
            raise ConfigError(f"samples={samples} but split {dataset.split!r} has only "
                              f"{dataset.images_per_class} images per class")
        if num_tasks == 0 or num_tasks < -1:
            raise ConfigError(f"num_tasks must be -1 (unlimited) or positive, got {num_tasks}")
        self.images = dataset.images.to(device)  # (classes, per_class, C, H, W) uint8
        self.ways, self.samples, self.num_tasks = ways, samples, num_tasks
        self.seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        if self.num_tasks < 0:
            raise TypeError("this task set is unlimited (num_tasks=-1) and has no length")
        return self.num_tasks

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Task ``index`` of the fixed pool: the same images and labels every time."""
        if not 0 <= index < len(self):
            raise IndexError(f"task {index} out of range for {self.num_tasks} tasks")
        return self._draw(torch.Generator().manual_seed(self.seed + 1 + index))

    def sample(self) -> tuple[Tensor, Tensor]:
        """One task: data (ways*samples, C, H, W) float in [0, 1] and labels (ways*samples,) int64."""
        if self.num_tasks > 0:
            return self[int(torch.randint(self.num_tasks, (), generator=self.generator))]
        return self._draw(self.generator)

    def _draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        num_classes, per_class = self.images.shape[:2]
        classes = torch.randperm(num_classes, generator=generator)[: self.ways]  # (ways,)
        picks = torch.rand(self.ways, per_class, generator=generator).argsort(dim=1)[:, : self.samples]
        device = self.images.device
        data = self.images[classes[:, None].to(device), picks.to(device)]  # (ways, samples, C, H, W)
        data = data.flatten(0, 1).float() / 255  # (ways*samples, C, H, W), a class's samples consecutive
        labels = torch.arange(self.ways, device=device).repeat_interleave(self.samples)
        return data, labels


class BenchmarkTasksets(NamedTuple):
    """The train, validation and test task sets of a benchmark."""

    train: TaskSet
    validation: TaskSet
    test: TaskSet


def list_tasksets() -> tuple[str, ...]:
    """Benchmark names ``get_tasksets`` accepts."""
    return BENCHMARKS


def get_tasksets(
    name: str,
    train_ways: int = 5,
    train_samples: int = 10,
    test_ways: int = 5,
    test_samples: int = 10,
    num_tasks: int = -1,
    root: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> BenchmarkTasksets:
    """Train, validation and test task sets of a benchmark, as ``learn2learn.vision.benchmarks.get_tasksets``.

    Args:
        name: "omniglot" or "mini-imagenet".
        train_ways: classes per training task.
        train_samples: images per class per training task (support and query together).
        test_ways: classes per validation and test task.
        test_samples: images per class per validation and test task.
        num_tasks: -1 for fresh tasks on every sample, else the size of each split's fixed task pool.
        root: the data folder holding ``omniglot/`` (metagrad's ``--data-dir``); ``~`` is expanded.
            None uses ``$METAGRAD_DATA`` or the default folder.
        device: where tasks are returned (learn2learn only accepts None).
        **kwargs: options of ``metagrad.data.datasets.load_dataset`` (e.g. ``rotations``, ``split_scheme``).

    Returns:
        ``BenchmarkTasksets(train, validation, test)``; each has ``sample() -> (data, labels)``.

    Raises:
        ConfigError: unknown name (the valid ones are listed) or impossible task shapes.

    Example:
        >>> tasksets = get_tasksets("omniglot", train_ways=5, train_samples=2, root="~/data")
        >>> data, labels = tasksets.train.sample()  # (10, 1, 28, 28), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    """
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    data_dir = None if root is None else os.path.expanduser(os.fspath(root))
    shapes = {"train": (train_ways, train_samples), "validation": (test_ways, test_samples),
              "test": (test_ways, test_samples)}
    tasksets = {}
    for split in SPLITS:
        ways, samples = shapes[split]
        dataset = datasets.load_dataset(name, split, data_dir=data_dir, **kwargs)
        tasksets[split] = TaskSet(dataset, ways, samples, num_tasks=num_tasks, device=device)
    return BenchmarkTasksets(**tasksets)
