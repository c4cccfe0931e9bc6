"""What the readers share about a split: the counts of a complete copy, its cached tensor, and how
``metagrad data info`` counts its images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metagrad.data import _io

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counts:
    """Classes per split and images per class (None: classes differ) of a complete copy; tests pass
    smaller ones."""

    classes: tuple[tuple[str, int], ...]  # (split, classes) for train, validation and test
    images: int | None = None

    def classes_in(self, split: str) -> int:
        return dict(self.classes)[split]


def cached_images(cache: Path, key: str, shape: tuple[int, ...], names: list[str]) -> Tensor | None:
    """The uint8 images of ``shape`` and ``names`` cached in ``cache`` from the sources ``key`` names, or
    None (absent, stale, or other contents: then reported, and the caller rebuilds it)."""
    cached = _io.load_cache(cache, key)
    if cached is None:
        return None
    images = cached.get("images")
    if isinstance(images, Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == shape \
            and cached.get("class_names") == names:
        return images
    logger.warning("cache %s holds unexpected contents; rebuilding it", cache)
    return None


def split_counts(class_sizes: Sequence[int]) -> dict[str, int]:
    """``{"classes", "images_per_class"}`` when every class has as many images, else ``{"classes",
    "images", "min_images_per_class", "max_images_per_class"}``."""
    sizes = list(class_sizes)
    if len(set(sizes)) <= 1:
        return {"classes": len(sizes), "images_per_class": sizes[0] if sizes else 0}
    return {"classes": len(sizes), "images": sum(sizes), "min_images_per_class": min(sizes),
            "max_images_per_class": max(sizes)}
