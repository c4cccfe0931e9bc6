"""``l2l.data.MetaDataset``: any indexable ``(sample, label)`` dataset with its label bookkeeping.

Also :class:`ClassImages`, the ``(image, label)`` view of a metagrad image tensor (classes x images per
class) that ``l2l.vision.datasets`` return and that ``MetaDataset`` makes of a metagrad
:class:`~metagrad.data.FewShotDataset`. A task set over one draws its tasks as tensor indexing
(see ``task_dataset.py``) instead of loading image after image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from metagrad.data.datasets import FewShotDataset

__all__ = ["ClassImages", "MetaDataset"]


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
