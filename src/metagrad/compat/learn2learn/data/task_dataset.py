"""``l2l.data.Taskset`` (``TaskDataset``): tasks drawn from a dataset by a list of task transforms.

The semantics are learn2learn's: ``num_tasks=-1`` draws a fresh task on every access (length 1);
a positive ``num_tasks`` caches the description of task ``i`` on first access, so ``taskset[i]`` is
always the same task; ``sample()`` picks ``random.randint(0, len - 1)``; random choices come from Python's
``random``. A task set pickles, so ``DataLoader(taskset, num_workers=...)`` works.

Fast path: over a tensor-backed dataset (metagrad's, ``l2l.vision.datasets``: :class:`ClassImages`)
with the standard pipeline, ``FusedNWaysKShots`` (or ``[FilterLabels,] NWays, KShots``) without
replacement, then ``LoadData`` and any of ``RemapLabels``, ``ConsecutiveLabels``,
``RandomClassRotation``, a task is drawn by metagrad's vectorized sampler
(:func:`metagrad.data.episodes.draw_tasks`) and gathered with one tensor index, instead of loading and
collating image after image. Its generator is seeded from Python's ``random``, so ``random.seed`` still
reproduces the tasks. The tasks have learn2learn's distribution and layout (see :class:`_TensorTasks`),
not the same draws as the per-sample path.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from metagrad.compat.learn2learn.data.description import DataDescription
from metagrad.compat.learn2learn.data.meta_dataset import ClassImages, MetaDataset
from metagrad.compat.learn2learn.data.rotation import RandomClassRotation
from metagrad.compat.learn2learn.data.transforms import (
    ConsecutiveLabels,
    FilterLabels,
    FusedNWaysKShots,
    KShots,
    LoadData,
    NWays,
    RemapLabels,
)
from metagrad.data.episodes import draw_tasks

__all__ = ["DataDescription", "TaskDataset", "Taskset"]

TaskTransforms = Sequence[Callable[[Any], Any]] | Callable[[Any], Any]


class Taskset(Dataset):
    """Tasks from ``dataset``, each described by applying ``task_transforms`` in order.

    Args:
        dataset: a ``MetaDataset`` or anything it accepts (wrapped in one).
        task_transforms: a list of task transforms (or one callable), e.g. ``[NWays(ds, 5),
            KShots(ds, 1), LoadData(ds), RemapLabels(ds)]``.
        num_tasks: -1 for a fresh task on every access, else the number of fixed tasks.
        task_collate: turns the list of a task's samples into the task; default: torch's
            ``default_collate`` (``(data, labels)`` stacked).

    Raises:
        ValueError: ``num_tasks`` is 0 or below -1.

    Example:
        >>> dataset = l2l.data.MetaDataset(my_dataset)
        >>> taskset = l2l.data.Taskset(dataset, [l2l.data.transforms.NWays(dataset, 5),
        ...     l2l.data.transforms.KShots(dataset, 2), l2l.data.transforms.LoadData(dataset),
        ...     l2l.data.transforms.RemapLabels(dataset)], num_tasks=1000)
        >>> data, labels = taskset.sample()
    """

    def __init__(self, dataset: Any, task_transforms: TaskTransforms | None = None, num_tasks: int = -1,
                 task_collate: Callable[[list[Any]], Any] | None = None) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks == 0 or num_tasks < -1:
            raise ValueError(f"num_tasks must be -1 (a fresh task each time) or positive, got {num_tasks!r}")
        self.dataset = dataset if isinstance(dataset, MetaDataset) else MetaDataset(dataset)
        self.task_transforms = [] if task_transforms is None else task_transforms
        self.num_tasks = num_tasks
        self.task_collate = default_collate if task_collate is None else task_collate
        self.sampled_descriptions: dict[int, Any] = {}  # task index -> description (fast path: a seed)
        self._fast = _TensorTasks.match(self.dataset, self.task_transforms, task_collate)
        self._task_id = 0

    def sample_task_description(self) -> list[DataDescription]:
        """A new task description: the transforms applied in order, starting from None (all samples)."""
        if callable(self.task_transforms):
            return self.task_transforms(None)
        description = None
        for transform in self.task_transforms:
            description = transform(description)
        return description

    def get_task(self, task_description: list[DataDescription]) -> Any:
        """Load a description's samples (each through its transforms) and collate them."""
        samples = []
        for dd in task_description:
            sample: Any = dd.index
            for transform in dd.transforms:
                sample = transform(sample)
            samples.append(sample)
        return self.task_collate(samples)

    def _new(self) -> Any:
        """A new description, or for the fast path the seed of a new task."""
        return random.getrandbits(63) if self._fast is not None else self.sample_task_description()

    def _task(self, description: Any) -> Any:
        return self._fast.task(description) if self._fast is not None else self.get_task(description)

    def sample(self) -> Any:
        """A random task of the set (a fresh one when ``num_tasks=-1``)."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i: int) -> Any:
        if self.num_tasks == -1:
            return self._task(self._new())
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(f"task {i} out of range for {self.num_tasks} tasks")
        i %= self.num_tasks
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self._new()
        return self._task(self.sampled_descriptions[i])

    def __iter__(self) -> Taskset:
        self._task_id = 0
        return self

    def __next__(self) -> Any:
        if self.num_tasks == -1:
            return self[0]
        if self._task_id >= self.num_tasks:
            raise StopIteration
        self._task_id += 1
        return self[self._task_id - 1]


class TaskDataset(Taskset):
    """learn2learn's former name of :class:`Taskset` (deprecated there too)."""

    _warned = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not TaskDataset._warned:
            TaskDataset._warned = True
            warnings.warn("TaskDataset is deprecated, use Taskset instead", DeprecationWarning, stacklevel=2)


@dataclass(frozen=True)
class _TensorTasks:
    """Whole tasks by tensor indexing, for the standard pipeline over :class:`ClassImages`.

    Layout and labels as learn2learn's pipeline gives them: ``ways * shots`` samples, those of a class
    consecutive; classes in drawn order, or by ascending label with ``ConsecutiveLabels`` (and after
    ``FilterLabels``, which keeps dataset order); labels the original ones, or with ``RemapLabels`` 0..N-1
    assigned at random (``shuffle=False``: by ascending original label).
    """

    images: Tensor  # (total, C, H, W) uint8, all images of the dataset, class after class
    class_sizes: Tensor  # (classes,) int64
    offsets: Tensor  # (classes,) int64: each class's first image in images
    pixel_max: float  # float value of pixel 255 (ClassImages.pixel_max)
    labels: Tensor  # (L,) int64: the classes tasks are drawn from
    ways: int
    shots: int
    consecutive: bool
    remap: str | None  # None, "shuffle" or "sorted"
    quarter_turns: tuple[int, ...] | None  # RandomClassRotation's choices

    @classmethod
    def match(cls, dataset: MetaDataset, transforms: Any, collate: Any) -> _TensorTasks | None:
        """The fast path for this pipeline, or None when only the per-sample path gives its tasks."""
        source = getattr(dataset, "dataset", None)  # a UnionMetaDataset wraps several
        if (collate is not None or callable(transforms) or not isinstance(source, ClassImages)
                or source.transform is not None or source.target_transform is not None
                or any(getattr(t, "dataset", None) is not dataset for t in transforms)):
            return None
        steps = [type(t) for t in transforms]
        labels: list[Any] = dataset.labels
        if steps[:1] == [FusedNWaysKShots] and not transforms[0].replacement:
            ways, shots, labels = transforms[0].n, transforms[0].k, transforms[0].filter_labels
            consecutive, rest = False, 1
        else:
            start = 1 if steps[:1] == [FilterLabels] else 0
            if steps[start:start + 2] != [NWays, KShots] or transforms[start + 1].replacement:
                return None
            if start:
                labels = [label for label in labels if label in set(transforms[0].labels)]
            # NWays on the whole dataset lists its classes in drawn order; after FilterLabels it keeps the
            # description's (dataset) order, which for ClassImages is ascending label order.
            ways, shots, rest = transforms[start].n, transforms[start + 1].k, start + 2
            consecutive = bool(start)
        tail = steps[rest + 1:]
        allowed = {RemapLabels, ConsecutiveLabels, RandomClassRotation}
        if steps[rest:rest + 1] != [LoadData] or not set(tail) <= allowed or len(set(tail)) != len(tail):
            return None
        sizes = source.class_sizes[torch.as_tensor(labels, dtype=torch.int64)]  # (L,) of the drawn classes
        if ways > len(labels) or shots > int(sizes.min()):
            return None  # the per-sample path raises the transforms' own errors
        remap = next((("shuffle" if t.shuffle else "sorted") for t in transforms if type(t) is RemapLabels),
                     None)
        rotation = next((t for t in transforms if type(t) is RandomClassRotation), None)
        if rotation is not None and source.flat_images.shape[-1] != source.flat_images.shape[-2]:
            return None  # a quarter turn changes a non-square image's shape
        return cls(
            images=source.flat_images, class_sizes=source.class_sizes, offsets=source.offsets,
            pixel_max=source.pixel_max,
            labels=torch.as_tensor(labels, dtype=torch.int64), ways=ways, shots=shots,
            consecutive=consecutive or ConsecutiveLabels in tail, remap=remap,
            quarter_turns=None if rotation is None else tuple(rotation.quarter_turns),
        )

    def task(self, seed: int) -> tuple[Tensor, Tensor]:
        """Task ``seed``: data (ways*shots, C, H, W) float and labels (ways*shots,) int64, on the device."""
        generator = torch.Generator().manual_seed(seed)
        n, k = self.ways, self.shots
        drawn, positions = draw_tasks(1, self.class_sizes[self.labels], n, k, generator)
        classes, positions = self.labels[drawn[0]], positions[0]  # (N,), (N, K)
        order = classes.argsort() if self.consecutive else torch.arange(n)  # group order in the task
        classes, positions = classes[order], positions[order]
        image_shape = self.images.shape[1:]
        flat = (self.offsets[classes][:, None] + positions).flatten().to(self.images.device)  # (N*K,)
        # index_select on the flat (total, C, H, W) images: about 100x faster here than advanced
        # indexing with two index tensors, which dominated the task's time on Omniglot.
        data = self.images.index_select(0, flat).view(n, k, *image_shape)
        if self.quarter_turns is not None:
            choices = torch.tensor(self.quarter_turns)
            turns = choices[torch.randint(len(choices), (n,), generator=generator)]  # (N,) per class
            data = torch.stack([torch.rot90(group, int(t), dims=(-2, -1)) for group, t in zip(data, turns)])
        data = data.flatten(0, 1).float() * (self.pixel_max / 255)  # (N*K, C, H, W)
        if self.remap == "shuffle":  # a uniformly random numbering of the classes, as random.shuffle's
            # sorted by label, the draw order is one; in draw order, a permutation drawn apart from it is
            group_labels = order if self.consecutive else torch.randperm(n, generator=generator)
        elif self.remap == "sorted":
            group_labels = classes.argsort().argsort()
        else:
            group_labels = classes
        return data, group_labels.repeat_interleave(k).to(self.images.device)
