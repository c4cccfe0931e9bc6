"""``l2l.vision.benchmarks.get_tasksets``: learn2learn's task sets over metagrad's datasets.

Names: learn2learn 0.2.0's ("omniglot", "mini-imagenet", "tiered-imagenet", "fc100", "cifarfs") and
"cub" (a metagrad extension). Each split is an ``l2l.data.Taskset`` with learn2learn's benchmark
pipeline: ``FusedNWaysKShots``, ``LoadData``, ``RemapLabels``, ``ConsecutiveLabels``. So ``sample()``
returns ``(data, labels)`` with ``ways * samples`` items, the samples of each class consecutive, the
classes numbered 0..ways-1 in random order; learn2learn's examples (which split support and query by
even and odd positions) work unchanged, and ``random.seed`` reproduces the tasks. The data is
metagrad's tensor, so tasks are drawn by the Taskset's tensor fast path. Omniglot's rotations are
metagrad's protocol (each rotation is a class of its own, option ``rotations``), not learn2learn's
per-task ``RandomClassRotation``; tiered-ImageNet's data augmentation options are not provided.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from metagrad.compat.learn2learn.data.meta_dataset import ClassImages, MetaDataset
from metagrad.compat.learn2learn.data.task_dataset import Taskset
from metagrad.compat.learn2learn.data.transforms import (
    ConsecutiveLabels,
    FusedNWaysKShots,
    LoadData,
    RemapLabels,
)
from metagrad.data import datasets
from metagrad.data.datasets import FewShotDataset
from metagrad.errors import ConfigError

__all__ = ["BenchmarkTasksets", "get_tasksets", "list_tasksets"]

SPLITS = ("train", "validation", "test")
BENCHMARKS = {"omniglot": "omniglot", "mini-imagenet": "mini-imagenet", "tiered-imagenet": "tiered-imagenet",
              "fc100": "fc100", "cifarfs": "cifar-fs", "cub": "cub"}
"""learn2learn's benchmark names (and ``"cub"``, a metagrad extension) -> metagrad's dataset names."""


def _taskset(dataset: FewShotDataset, ways: int, samples: int, num_tasks: int,
             device: torch.device | str | None) -> Taskset:
    for name, value in (("ways", ways), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if ways > dataset.num_classes:
        raise ConfigError(f"ways={ways} but split {dataset.split!r} has only {dataset.num_classes} classes")
    if samples > dataset.images_per_class:
        smallest = "per class" if dataset.class_sizes is None else "in its smallest class"
        raise ConfigError(f"samples={samples} but split {dataset.split!r} has only "
                          f"{dataset.images_per_class} images {smallest}")
    if num_tasks == 0 or num_tasks < -1:
        raise ConfigError(f"num_tasks must be -1 (unlimited) or positive, got {num_tasks}")
    meta = MetaDataset(ClassImages(dataset.images.to(device), class_sizes=dataset.class_sizes))
    transforms = [FusedNWaysKShots(meta, n=ways, k=samples), LoadData(meta), RemapLabels(meta),
                  ConsecutiveLabels(meta)]
    return Taskset(meta, transforms, num_tasks=num_tasks)


class BenchmarkTasksets(NamedTuple):
    """The train, validation and test task sets of a benchmark."""

    train: Taskset
    validation: Taskset
    test: Taskset


def list_tasksets() -> tuple[str, ...]:
    """Benchmark names ``get_tasksets`` accepts: learn2learn 0.2.0's five, then ``"cub"``."""
    return tuple(BENCHMARKS)


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
        name: learn2learn's "omniglot", "mini-imagenet", "tiered-imagenet", "fc100" or "cifarfs", or "cub"
            (CUB-200-2011, a metagrad extension: learn2learn 0.2.0 has no CUB benchmark; Chen et al.'s split
            unless ``split_scheme="triantafillou"``).
        train_ways: classes per training task.
        train_samples: images per class per training task (support and query together).
        test_ways: classes per validation and test task.
        test_samples: images per class per validation and test task.
        num_tasks: -1 for fresh tasks on every sample, else the size of each split's fixed task pool.
        root: the data folder holding ``omniglot/``, ``mini-imagenet/``, learn2learn's ``cifarfs/``,
            ``tiered-imagenet/``, FC100's pickles... (metagrad's ``--data-dir``); ``~`` is expanded. None
            uses ``$METAGRAD_DATA`` or the default folder.
        device: where the images are kept and tasks are returned (learn2learn: ``OnDeviceDataset``).
        **kwargs: options of ``metagrad.data.datasets.load_dataset`` (e.g. ``rotations``, ``split_scheme``).

    Returns:
        ``BenchmarkTasksets(train, validation, test)``, each an ``l2l.data.Taskset``:
        ``sample() -> (data, labels)``.

    Raises:
        ConfigError: unknown name (the valid ones are listed) or impossible task shapes.

    Example:
        >>> tasksets = get_tasksets("omniglot", train_ways=5, train_samples=2, root="~/data")
        >>> data, labels = tasksets.train.sample()  # (10, 1, 28, 28), e.g. [3, 3, 0, 0, 4, 4, 1, 1, 2, 2]
    """
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    data_dir = None if root is None else os.path.expanduser(os.fspath(root))
    shapes = {"train": (train_ways, train_samples), "validation": (test_ways, test_samples),
              "test": (test_ways, test_samples)}
    tasksets = {}
    for split in SPLITS:
        ways, samples = shapes[split]
        dataset = datasets.load_dataset(BENCHMARKS[name], split, data_dir=data_dir, **kwargs)
        tasksets[split] = _taskset(dataset, ways, samples, num_tasks, device)
    return BenchmarkTasksets(**tasksets)
