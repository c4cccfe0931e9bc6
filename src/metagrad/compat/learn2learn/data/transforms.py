"""``l2l.data.transforms``: learn2learn's task transforms, with its semantics.

A task description is a list of :class:`~metagrad.compat.learn2learn.data.task_dataset.DataDescription`
(an index into the dataset plus the transforms to apply to that sample). Each task transform takes a
description (None: all samples of the dataset) and returns a new one. As in learn2learn, the random
choices come from Python's ``random`` module (so ``random.seed`` reproduces tasks, and each DataLoader
worker draws its own): inside the compat layer learn2learn's behaviour wins over metagrad's generators.
Every transform pickles, so a task set can be read by DataLoader workers.
"""

from __future__ import annotations

import copy
import functools
import itertools
import random
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

from metagrad.compat.learn2learn.data.description import DataDescription

__all__ = ["ConsecutiveLabels", "FilterLabels", "FusedNWaysKShots", "KShots", "LoadData", "NWays",
           "RemapLabels", "TaskTransform"]

Description = list[DataDescription]


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class TaskTransform:
    """Base of the task transforms: holds the dataset; ``new_task()`` describes all of its samples."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def new_task(self) -> Description:
        return [DataDescription(i) for i in range(len(self.dataset))]

    def __call__(self, task_description: Description | None) -> Description:
        raise NotImplementedError


def _load(dataset: Any, index: int) -> Any:
    return dataset[index]


class LoadData(TaskTransform):
    """Load each sample from the dataset: its first transform becomes ``index -> dataset[index]``."""

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        load = functools.partial(_load, self.dataset)
        for dd in task_description:
            dd.transforms.append(load)
        return task_description


class FilterLabels(TaskTransform):
    """Keep only the samples whose label is in ``labels``.

    Args:
        dataset: a MetaDataset.
        labels: the labels to keep.
    """

    def __init__(self, dataset: Any, labels: Sequence[Hashable]) -> None:
        super().__init__(dataset)
        self.labels = list(labels)
        keep = set(self.labels)
        self._kept = {i for i, label in dataset.indices_to_labels.items() if label in keep}

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        return [dd for dd in task_description if dd.index in self._kept]


class NWays(TaskTransform):
    """Keep the samples of ``n`` labels drawn at random among those present in the description.

    Raises:
        ValueError: fewer than ``n`` labels are present (or ``n`` is not a positive integer).
    """

    def __init__(self, dataset: Any, n: int = 2) -> None:
        super().__init__(dataset)
        self.n = _check_count("n", n)

    def new_task(self) -> Description:
        labels = _sample(self.dataset.labels, self.n, "NWays", "labels in the dataset")
        return [DataDescription(i) for label in labels for i in self.dataset.labels_to_indices[label]]

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            return self.new_task()
        labels_of = self.dataset.indices_to_labels
        present = list(dict.fromkeys(labels_of[dd.index] for dd in task_description))
        chosen = set(_sample(present, self.n, "NWays", "labels in the task description"))
        return [dd for dd in task_description if labels_of[dd.index] in chosen]


class KShots(TaskTransform):
    """Keep ``k`` samples of each label present, drawn at random (with or without replacement).

    Raises:
        ValueError: without replacement, a label has fewer than ``k`` samples.
    """

    def __init__(self, dataset: Any, k: int = 1, replacement: bool = False) -> None:
        super().__init__(dataset)
        self.k = _check_count("k", k)
        self.replacement = replacement

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        by_label: dict[Hashable, Description] = defaultdict(list)
        for dd in task_description:
            by_label[self.dataset.indices_to_labels[dd.index]].append(dd)
        if self.replacement:  # copies, so a sample drawn twice can be transformed twice
            return [copy.deepcopy(dd) for dds in by_label.values() for dd in random.choices(dds, k=self.k)]
        return list(itertools.chain.from_iterable(
            _sample(dds, self.k, "KShots", f"samples of label {label!r}") for label, dds in by_label.items()))


class FusedNWaysKShots(TaskTransform):
    """``FilterLabels``, ``NWays`` and ``KShots`` in one step (the usual first transform).

    Args:
        dataset: a MetaDataset.
        n: labels per task.
        k: samples per label.
        replacement: draw the samples of a label with replacement.
        filter_labels: the labels tasks are drawn from; None for all.
    """

    def __init__(self, dataset: Any, n: int = 2, k: int = 1, replacement: bool = False,
                 filter_labels: Sequence[Hashable] | None = None) -> None:
        super().__init__(dataset)
        self.n = _check_count("n", n)
        self.k = _check_count("k", k)
        self.replacement = replacement
        self.filter_labels = list(dataset.labels if filter_labels is None else filter_labels)
        unknown = [label for label in self.filter_labels if label not in dataset.labels_to_indices]
        if unknown:
            raise ValueError(f"filter_labels {unknown[:5]} are not labels of the dataset")

    def new_task(self) -> Description:
        description = []
        for label in _sample(self.filter_labels, self.n, "FusedNWaysKShots", "labels to draw from"):
            indices = self.dataset.labels_to_indices[label]
            if self.replacement:
                chosen = [random.choice(indices) for _ in range(self.k)]
            else:
                chosen = _sample(indices, self.k, "FusedNWaysKShots", f"samples of label {label!r}")
            description.extend(DataDescription(i) for i in chosen)
        return description

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            return self.new_task()
        filtered = FilterLabels(self.dataset, self.filter_labels)(task_description)
        return KShots(self.dataset, self.k, self.replacement)(NWays(self.dataset, self.n)(filtered))


class ConsecutiveLabels(TaskTransform):
    """Order the samples by their (original) label, so each label's samples are consecutive."""

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        return sorted(task_description, key=lambda dd: self.dataset.indices_to_labels[dd.index])


def _remap(mapping: dict[Hashable, int], sample: Any) -> list[Any]:
    sample = list(sample)
    label = sample[1]
    # the bookkeeping holds 0-d tensor labels as Python scalars (MetaDataset stores .item())
    sample[1] = mapping[label.item() if hasattr(label, "item") else label]
    return sample


class RemapLabels(TaskTransform):
    """Relabel a task's K labels as 0..K-1 (in random order with ``shuffle``). Place it after ``LoadData``.

    Unshuffled, the labels are numbered in sorted order (learn2learn: in ``set`` iteration order).
    """

    def __init__(self, dataset: Any, shuffle: bool = True) -> None:
        super().__init__(dataset)
        self.shuffle = shuffle

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        labels = sorted({self.dataset.indices_to_labels[dd.index] for dd in task_description}, key=_order)
        if self.shuffle:
            random.shuffle(labels)
        remap = functools.partial(_remap, {label: i for i, label in enumerate(labels)})
        for dd in task_description:
            dd.transforms.append(remap)
        return task_description


def _order(label: Hashable) -> tuple[str, Any]:
    return (type(label).__name__, label)


def _sample(population: Sequence[Any], k: int, who: str, what: str) -> list[Any]:
    if k > len(population):
        raise ValueError(f"{who} needs {k} {what} but there are only {len(population)}; "
                         "lower the number of ways/shots or use a dataset with more")
    return random.sample(list(population), k)
