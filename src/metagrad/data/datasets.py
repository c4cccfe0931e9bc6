"""Few-shot datasets: classes x samples image tensors, plus a name -> constructor registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class FewShotDataset:
    """One split of a few-shot dataset, decoded once into a single uint8 tensor.

    Attributes:
        name: dataset name in the registry, e.g. ``"omniglot"``.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        images: (num_classes, images_per_class, C, H, W) uint8. Every class has the same number of images.
        class_names: one human-readable name per class, in the order of ``images``.
    """

    name: str
    split: str
    images: Tensor
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(
                f"images must be a uint8 tensor (classes, samples, C, H, W), got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def images_per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[2:]
        return (c, h, w)
