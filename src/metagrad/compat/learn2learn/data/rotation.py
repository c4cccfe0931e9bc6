"""``RandomClassRotation`` (``l2l.vision.transforms``): rotate all images of a class by one random angle.

Defined beside the task transforms, because the Taskset's fast path recognizes it; ``l2l.vision.transforms``
re-exports it under learn2learn's name.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metagrad.compat.learn2learn.data.description import DataDescription

__all__ = ["RandomClassRotation"]


def _rotate(quarter_turns: int, sample: Any) -> tuple[Tensor, Any]:
    # Counter-clockwise, as PIL and torchvision rotate for a positive angle.
    return torch.rot90(sample[0], quarter_turns, dims=(-2, -1)), sample[1]


class RandomClassRotation:
    """Draw one angle per class of a task from ``degrees`` (uniformly, Python's ``random``) and rotate
    every image of that class by it. Place it after ``LoadData``.

    Unlike learn2learn (which goes through torchvision and PIL), images are tensors (..., H, W) and
    rotated with ``torch.rot90``, so the angles must be multiples of 90 degrees, exact (no resampling).

    Args:
        dataset: the MetaDataset the task is drawn from.
        degrees: the angles to draw from, e.g. ``[0.0, 90.0, 180.0, 270.0]``.

    Raises:
        ValueError: an angle is not a multiple of 90, or ``degrees`` is empty.
    """

    def __init__(self, dataset: Any, degrees: Sequence[float]) -> None:
        bad = [d for d in degrees if float(d) % 90 != 0]
        if bad or not degrees:
            raise ValueError(f"RandomClassRotation rotates by multiples of 90 degrees (exactly, with "
                             f"torch.rot90); got {list(degrees)}. Use e.g. [0.0, 90.0, 180.0, 270.0]")
        self.dataset = dataset
        self.degrees = list(degrees)

    @property
    def quarter_turns(self) -> list[int]:
        """``degrees`` as counter-clockwise quarter turns in {0, 1, 2, 3}."""
        return [int(float(d) // 90) % 4 for d in self.degrees]

    def __call__(self, task_description: list[DataDescription]) -> list[DataDescription]:
        turns = self.quarter_turns
        per_label: dict[Any, int] = {}
        for dd in task_description:
            label = self.dataset.indices_to_labels[dd.index]
            if label not in per_label:
                per_label[label] = random.choice(turns)
            dd.transforms.append(functools.partial(_rotate, per_label[label]))
        return task_description
