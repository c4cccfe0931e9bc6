"""``l2l.data.MetaDataset``: any indexable ``(sample, label)`` dataset with its label bookkeeping, and
learn2learn's two datasets made of others: ``UnionMetaDataset`` and ``FilteredMetaDataset``.

Also :class:`ClassImages`, the ``(image, label)`` view of a metagrad image tensor (classes x images per
class) that ``l2l.vision.datasets`` return and that ``MetaDataset`` makes of a metagrad
:class:`~metagrad.data.FewShotDataset`. A task set over one draws its tasks as tensor indexing
(see ``task_dataset.py``) instead of loading image after image.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from metagrad.data.datasets import FewShotDataset

__all__ = ["ClassImages", "FilteredMetaDataset", "MetaDataset", "UnionMetaDataset"]


class ClassImages(Dataset):
    """``(image, label)`` pairs over a uint8 tensor (classes, images_per_class, C, H, W), or over flat
    images (total, C, H, W) with ``class_sizes`` when classes differ in size.

    Items are the images of class 0, then class 1...: item ``i`` of equal classes is image
    ``i % images_per_class`` of class ``label = i // images_per_class``. Each is a float tensor (C, H, W)
    (``uint8 / 255`` in [0, 1] by default), passed through ``transform``; the label is a Python int
    passed through ``target_transform``.

    Args:
        images: (classes, images_per_class, C, H, W) uint8, or (total, C, H, W) with ``class_sizes``.
        pixel_max: the float value of pixel 255: 1.0 (the default), or 255.0 for learn2learn's
            ``MiniImagenet``, whose images are unscaled floats.
        transform: applied to each image tensor (learn2learn's datasets give PIL images; these give
            tensors, so torchvision's ``ToTensor`` is not needed).
        target_transform: applied to each label.
        class_sizes: images per class of flat ``images``, in order; None for the 5-D layout.
    """

    def __init__(self, images: Tensor, transform: Callable[[Tensor], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None, pixel_max: float = 1.0,
                 class_sizes: Sequence[int] | None = None) -> None:
        if class_sizes is None:
            if images.dim() != 5:
                raise ValueError(f"images must be (classes, images_per_class, C, H, W), "
                                 f"got {tuple(images.shape)}")
            sizes = torch.full((images.shape[0],), images.shape[1], dtype=torch.int64)
        else:
            sizes = torch.as_tensor(list(class_sizes), dtype=torch.int64)
            if images.dim() != 4 or int(sizes.sum()) != images.shape[0] or bool((sizes < 1).any()):
                raise ValueError(f"flat images (total, C, H, W) {tuple(images.shape)} do not match "
                                 f"class_sizes summing to {int(sizes.sum())}")
        self.images = images
        self.flat_images = images if class_sizes is not None else images.flatten(0, 1)  # (total, C, H, W)
        self.class_sizes = sizes  # (classes,) int64
        self.offsets = sizes.cumsum(0) - sizes  # (classes,): each class's first item
        self.transform = transform
        self.target_transform = target_transform
        self.pixel_max = pixel_max

    def __len__(self) -> int:
        return self.flat_images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        label = int(torch.searchsorted(self.offsets, torch.tensor(index), right=True)) - 1
        image: Any = self.flat_images[index].float() * (self.pixel_max / 255)  # (C, H, W)
        if self.transform is not None:
            image = self.transform(image)
        target: Any = label if self.target_transform is None else self.target_transform(label)
        return image, target

    def labels_of_items(self) -> list[int]:
        """The label of every item, in item order (no image is loaded)."""
        return torch.arange(len(self.class_sizes)).repeat_interleave(self.class_sizes).tolist()


class MetaDataset(Dataset):
    """Wrap a classification dataset so tasks can pick samples by label (learn2learn's ``MetaDataset``).

    Args:
        dataset: anything with ``len()`` and ``dataset[i] -> (sample, label)``: a torch ``Dataset``, a
            list of pairs, a :class:`ClassImages` or a metagrad ``FewShotDataset`` (wrapped in
            :class:`ClassImages`). Labels may be ints, strings or 0-d tensors (stored as ``.item()``).
        labels_to_indices: label -> list of indices, if already known (else built by reading every item).
        indices_to_labels: index -> label, if already known.

    Attributes:
        labels: the distinct labels, in order of first appearance.
        labels_to_indices: label -> indices of its samples.
        indices_to_labels: index -> label.

    Raises:
        TypeError: ``dataset`` has no ``len()`` or no indexing.
        ValueError: a label is not a scalar.
    """

    def __init__(self, dataset: Any, labels_to_indices: dict[Hashable, list[int]] | None = None,
                 indices_to_labels: dict[int, Hashable] | None = None) -> None:
        if isinstance(dataset, FewShotDataset):
            dataset = ClassImages(dataset.images, class_sizes=dataset.class_sizes)
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"MetaDataset needs an indexable dataset with a length (dataset[i] -> "
                            f"(sample, label)), got {type(dataset).__name__}")
        self.dataset = dataset
        self.create_bookkeeping(labels_to_indices, indices_to_labels)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def create_bookkeeping(self, labels_to_indices: dict[Hashable, list[int]] | None = None,
                           indices_to_labels: dict[int, Hashable] | None = None) -> None:
        """Build ``labels_to_indices``, ``indices_to_labels`` and ``labels`` (from either map if given)."""
        if labels_to_indices is None and indices_to_labels is None:
            if isinstance(self.dataset, ClassImages) and self.dataset.target_transform is None:
                # the layout says it: no item is loaded
                indices_to_labels = dict(enumerate(self.dataset.labels_of_items()))
            elif _labels_tensor(self.dataset) is not None:  # a TensorDataset: its label column says it
                indices_to_labels = dict(enumerate(_labels_tensor(self.dataset).tolist()))
            else:
                indices_to_labels = {i: _scalar_label(self.dataset[i], i) for i in range(len(self.dataset))}
        if labels_to_indices is None:
            labels_to_indices = defaultdict(list)
            for index, label in indices_to_labels.items():
                labels_to_indices[label].append(index)
        elif indices_to_labels is None:
            indices_to_labels = {i: label for label, indices in labels_to_indices.items() for i in indices}
        self.labels_to_indices = dict(labels_to_indices)
        self.indices_to_labels = dict(indices_to_labels)
        self.labels = list(self.labels_to_indices)


def _labels_tensor(dataset: Any) -> Tensor | None:
    """The 1-D label column of a plain ``TensorDataset`` (or ``OnDeviceDataset``, whose transform touches
    only the samples), or None for any other dataset, whose labels only its items tell."""
    from metagrad.compat.learn2learn.data.utils import OnDeviceDataset

    if type(dataset) not in (TensorDataset, OnDeviceDataset) or len(dataset.tensors) != 2:
        return None
    labels = dataset.tensors[1]
    return labels if labels.dim() == 1 else None


class UnionMetaDataset(MetaDataset):
    """The concatenation of several datasets, labels renumbered so that no two datasets share one.

    Dataset ``d``'s labels become consecutive integers after those of the datasets before it, in the
    order of its ``labels``; item ``i`` is the item of the dataset it falls in, with its new label.

    Args:
        datasets: ``MetaDataset`` s (anything else is wrapped in one).

    Example:
        >>> union = l2l.data.UnionMetaDataset([train, valid, test])  # 64 + 16 + 20 = 100 labels
    """

    def __init__(self, datasets: Iterable[Any]) -> None:
        self.datasets = [ds if isinstance(ds, MetaDataset) else MetaDataset(ds) for ds in datasets]
        self._starts: list[int] = []  # index of each dataset's first item in the union
        indices_to_labels: dict[int, Hashable] = {}
        first_index = first_label = 0
        for dataset in self.datasets:
            renumbered = {label: first_label + i for i, label in enumerate(dataset.labels)}
            for index, label in dataset.indices_to_labels.items():
                indices_to_labels[first_index + index] = renumbered[label]
            self._starts.append(first_index)
            first_index += len(dataset.indices_to_labels)
            first_label += len(dataset.labels_to_indices)
        self.create_bookkeeping(indices_to_labels=indices_to_labels)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a union of {len(self)} items")
        position = bisect.bisect_right(self._starts, index) - 1
        item = list(self.datasets[position][index - self._starts[position]])
        item[1] = self.indices_to_labels[index]
        return item

    def __len__(self) -> int:
        return len(self.indices_to_labels)


class FilteredMetaDataset(MetaDataset):
    """The items of ``dataset`` whose label is in ``labels``, renumbered 0.. in the order of ``labels``
    (each label's items in their original order); labels keep their values.

    Args:
        dataset: a ``MetaDataset`` (anything else is wrapped in one).
        labels: the labels to keep.

    Raises:
        ValueError: a label of ``labels`` is not in ``dataset``.

    Example:
        >>> evens = l2l.data.FilteredMetaDataset(dataset, [0, 2, 4])
    """

    def __init__(self, dataset: Any, labels: Iterable[Hashable]) -> None:
        self.dataset = dataset if isinstance(dataset, MetaDataset) else MetaDataset(dataset)
        labels = list(labels)
        unknown = [label for label in labels if label not in self.dataset.labels_to_indices]
        if unknown:
            raise ValueError(f"FilteredMetaDataset: labels {unknown[:5]} are not in the dataset, whose "
                             f"labels include {self.dataset.labels[:5]}")
        self.to_true_indices = [i for label in labels for i in self.dataset.labels_to_indices[label]]
        self.create_bookkeeping(indices_to_labels={
            new: self.dataset.indices_to_labels[true] for new, true in enumerate(self.to_true_indices)})

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.to_true_indices[index]]

    def __len__(self) -> int:
        return len(self.to_true_indices)


def _scalar_label(item: Any, index: int) -> Hashable:
    try:
        label = item[1]
    except (TypeError, IndexError, KeyError) as err:
        raise TypeError(f"dataset[{index}] must be a (sample, label) pair, "
                        f"got {type(item).__name__}") from err
    if hasattr(label, "item"):
        try:
            label = label.item()
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"dataset[{index}] has a label of shape {tuple(label.shape)}; "
                             "MetaDataset needs one scalar label per sample") from err
    return label
