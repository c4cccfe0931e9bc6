"""``l2l.data.partition_task`` and ``l2l.data.InfiniteIterator``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

__all__ = ["InfiniteIterator", "partition_task"]


def partition_task(data: Tensor, labels: Tensor, shots: int = 1
                   ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split a task into support (the first ``shots`` samples of each label) and query (the rest).

    Args:
        data: (B, ...) samples.
        labels: (B,) labels; every label must have the same number of samples.
        shots: support samples per label.

    Returns:
        ``((support_data, support_labels), (query_data, query_labels))``, grouped by label in
        ascending order, each group's samples in their original order.

    Raises:
        ValueError: ``data`` and ``labels`` differ in length, or the labels have unequal counts, or a
            label has fewer than ``shots`` samples.
    """
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"data has {data.shape[0]} samples but labels has {labels.shape[0]}")
    classes, counts = labels.unique(return_counts=True)
    if len(classes) and (counts != counts[0]).any():
        raise ValueError(f"partition_task needs the same number of samples per label, got "
                         f"{dict(zip(classes.tolist(), counts.tolist()))}")
    per_label = int(counts[0]) if len(classes) else 0
    if shots > per_label:
        raise ValueError(f"shots={shots} but each label has only {per_label} samples")
    # a stable sort groups the samples by label and keeps their order within a label
    grouped = labels.argsort(stable=True).view(len(classes), per_label)  # (ways, per_label) indices
    support, query = grouped[:, :shots].flatten(), grouped[:, shots:].flatten()
    return (data[support], labels[support]), (data[query], labels[query])


class InfiniteIterator:
    """Iterate over ``dataloader`` forever, starting it again whenever it is exhausted.

    Raises:
        ValueError: (on ``next``) the dataloader yields nothing at all.
    """

    def __init__(self, dataloader: Iterable[Any]) -> None:
        self.dataloader = dataloader
        self.iterator: Iterator[Any] = iter(dataloader)

    def __iter__(self) -> InfiniteIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
        try:
            return next(self.iterator)
        except StopIteration:
            raise ValueError("InfiniteIterator: the dataloader is empty") from None


