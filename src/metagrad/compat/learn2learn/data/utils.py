"""``l2l.data.OnDeviceDataset``, ``l2l.data.partition_task`` and ``l2l.data.InfiniteIterator``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from metagrad.compat.learn2learn.data.meta_dataset import ClassImages

__all__ = ["InfiniteIterator", "OnDeviceDataset", "partition_task"]


class OnDeviceDataset(TensorDataset):
    """A whole dataset as two tensors on ``device``: every sample stacked, and the labels.

    As learn2learn's: the samples are read once (``for x, y in dataset``), stacked along a new first
    dimension and moved to ``device``; on the CPU they are pinned when CUDA is available, for fast
    copies to the GPU. ``transform`` is applied to each sample when it is read back, not when stored.
    A :class:`ClassImages` (``FullOmniglot``, ``MiniImagenet``) without transforms is converted as one
    tensor operation, with the same values.

    Args:
        dataset: ``(sample, label)`` pairs whose samples are tensors of one shape and whose labels are
            numbers (or 0-d tensors).
        device: where the tensors live; None: where the samples are.
        transform: applied to each sample tensor on access.

    Attributes:
        tensors: ``(data (N, ...), labels (N,))``.

    Raises:
        ValueError: the dataset is empty, or its samples are not tensors of one shape.

    Example:
        >>> omniglot = l2l.data.OnDeviceDataset(l2l.vision.datasets.FullOmniglot(root), device="cuda")
        >>> tasks = l2l.data.Taskset(l2l.data.MetaDataset(omniglot), [...])
    """

    def __init__(self, dataset: Any, device: torch.device | str | None = None,
                 transform: Callable[[Tensor], Any] | None = None) -> None:
        plain = isinstance(dataset, ClassImages) and dataset.transform is None
        if plain and dataset.target_transform is None:
            # what ClassImages.__getitem__ computes per image, on all of them at once
            data = dataset.flat_images.float() * (dataset.pixel_max / 255)  # (N, C, H, W)
            labels = torch.arange(len(dataset.class_sizes)).repeat_interleave(dataset.class_sizes)  # (N,)
        else:
            data, labels = _stack(dataset)
        if device is not None:
            data, labels = data.to(device), labels.to(device)
        if data.device.type == "cpu" and torch.cuda.is_available():
            data, labels = data.pin_memory(), labels.pin_memory()
        super().__init__(data, labels)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        x, y = super().__getitem__(index)
        return (x if self.transform is None else self.transform(x)), y


def _stack(dataset: Any) -> tuple[Tensor, Tensor]:
    """(samples stacked (N, ...), labels (N,)) of an iterable of ``(sample, label)`` pairs."""
    samples, labels = [], []
    for i, (x, y) in enumerate(dataset):
        if not isinstance(x, Tensor):
            raise TypeError(f"OnDeviceDataset stacks tensors; sample {i} is a {type(x).__name__} (give the "
                             "dataset a transform that returns tensors)")
        if samples and x.shape != samples[0].shape:
            raise ValueError(f"OnDeviceDataset needs samples of one shape; sample 0 is "
                             f"{tuple(samples[0].shape)}, sample {i} is {tuple(x.shape)}")
        samples.append(x)
        labels.append(y.item() if isinstance(y, Tensor) else y)
    if not samples:
        raise ValueError("OnDeviceDataset: the dataset is empty")
    return torch.stack(samples), torch.tensor(labels)


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


