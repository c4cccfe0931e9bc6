"""N-way K-shot task sampling: a whole meta-batch at once, as tensor indexing on the target device."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from metagrad.data.datasets import FewShotDataset
from metagrad.errors import ConfigError
from metagrad.types import Episode

__all__ = ["EpisodeSampler", "draw_tasks", "task_generator"]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name}={value} must be a positive integer (at least 1)")
    return value


def task_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one task stream (``"train"``, ``"validation"``, ``"test"``, ``"inner_lr"``).

    Each purpose gets its own seed, a hash of ``(seed, purpose)``, so that the streams are independent
    and, e.g., changing ``eval_tasks`` does not change the training tasks.
    """
    digest = hashlib.sha256(f"metagrad/{seed}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_tasks(num_tasks: int, class_sizes: Tensor, ways: int, samples: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The indices of ``num_tasks`` tasks: ``ways`` distinct classes, ``samples`` distinct images of each.

    Args:
        class_sizes: (C,) int64, the images of each class; every class needs at least ``samples``.

    Returns:
        classes (T, N) int64 in [0, C), in uniformly random order, and positions (T, N, S) int64, distinct
        and in uniformly random order within each chosen class (``< class_sizes[class]``). On the CPU.
        Where all classes have the same size the draws are those of a dataset of equal classes, key for
        key (the size mask below changes nothing).
    """
    num_classes, largest = len(class_sizes), int(class_sizes.max())
    # The indices of the n largest of C uniform keys are n distinct classes in uniformly random order:
    # the first n entries of a random permutation, without sorting all C keys (topk, not argsort).
    classes = torch.rand(num_tasks, num_classes, generator=generator).topk(ways, dim=1).indices  # (T, N)
    # Likewise S distinct images of each chosen class: (T, N, S) positions within the class. Keys of
    # positions past a smaller class's end are set below every uniform key, so topk never picks them.
    keys = torch.rand(num_tasks, ways, largest, generator=generator)  # (T, N, largest)
    sizes = class_sizes[classes]  # (T, N)
    if bool((sizes < largest).any()):
        keys.masked_fill_(torch.arange(largest) >= sizes.unsqueeze(2), -1.0)
    positions = keys.topk(samples, dim=2).indices
    return classes, positions


class EpisodeSampler:
    """Samples meta-batches of N-way K-shot tasks from one split of a :class:`FewShotDataset`.

    Each task draws ``ways`` distinct classes of the split and, per class, ``shots + query_shots``
    distinct images: the first ``shots`` form the support set, the rest the query set, so support
    and query never share an image. Labels are ``0..ways-1`` in the (random) order the classes were
    drawn, so the class-to-label assignment differs per task. Within a task the samples of one class
    are consecutive (labels ``[0]*K + [1]*K + ...``).

    The dataset's uint8 tensor is moved to ``device`` once; sampling draws indices on the CPU from
    the given generator (so a seed reproduces the tasks on any device), gathers the pixels on
    ``device`` and converts them to float32 there. No Python loop runs over tasks or images.

    Args:
        dataset: one split, images (C, S, c, h, w) uint8, or classes of different sizes (then each task
            draws uniformly among the images of each of its classes).
        ways: N, classes per task.
        shots: K, support images per class.
        query_shots: Q, query images per class.
        device: where the images live and the episodes are returned (default: CPU).

    Raises:
        ConfigError: a non-positive or non-integer count, fewer than 2 ways or more than the split has
            classes, or more shots + query_shots than the smallest class has images.

    Example:
        >>> sampler = EpisodeSampler(train, ways=5, shots=1, query_shots=15)  # doctest: +SKIP
        >>> episode = sampler.sample(32, torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> episode.support_x.shape  # (T, N*K, C, H, W)  # doctest: +SKIP
        torch.Size([32, 5, 1, 28, 28])
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        query_shots: int,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.ways = _check_count("ways", ways)
        self.shots = _check_count("shots", shots)
        self.query_shots = _check_count("query_shots", query_shots)
        classes, smallest = dataset.num_classes, dataset.images_per_class
        where = f"split '{dataset.split}' of {dataset.name}"
        if ways < 2:  # every query would be labelled 0: 100% accuracy whatever the model
            raise ConfigError(f"ways={ways}: a classification task needs at least 2 classes; use ways >= 2")
        if ways > classes:
            raise ConfigError(f"ways={ways} but {where} has only {classes} classes; use ways <= {classes}")
        if shots + query_shots > smallest:
            each = "each class" if dataset.class_sizes is None else "its smallest class"
            raise ConfigError(
                f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots} but {each} of "
                f"{where} has only {smallest} images; lower shots or query_shots so they sum to at most "
                f"{smallest}"
            )
        self.dataset = dataset
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._sizes = torch.tensor(dataset.sizes, dtype=torch.int64)  # (C,)
        self._offsets = dataset.offsets  # (C,): the flat index of each class's first image
        # A memory-mapped dataset stays on disk: tasks are gathered from it on the CPU and only they move
        # to the device. Any other is moved to the device once.
        self._release = dataset.release_pages
        self._images = dataset.flat_images  # (total_images, c, h, w)
        if self._release is None:
            self._images = self._images.to(self.device)
        labels = torch.arange(ways, device=self.device)
        self._support_y = labels.repeat_interleave(shots)  # (N*K,) = [0]*K + [1]*K + ...
        self._query_y = labels.repeat_interleave(query_shots)  # (N*Q,)

    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode:
        """Draw ``num_tasks`` independent tasks.

        Args:
            num_tasks: T, tasks in the meta-batch.
            generator: a CPU ``torch.Generator``; the same state gives the same tasks.

        Returns:
            An :class:`~metagrad.types.Episode` on ``device``: support_x (T, N*K, c, h, w) and query_x
            (T, N*Q, c, h, w) float32 in [0, 1] (``uint8 / 255``; for Omniglot ink = 1, background = 0),
            support_y (T, N*K) and query_y (T, N*Q) int64 in [0, N).
        """
        t = _check_count("num_tasks", num_tasks)
        n, k, q = self.ways, self.shots, self.query_shots
        classes, samples = draw_tasks(t, self._sizes, n, k + q, generator)
        # (T, N, K+Q) image indices into the flat images
        flat = (self._offsets[classes].unsqueeze(2) + samples).to(self._images.device)
        support = flat[:, :, :k].reshape(t, n * k)  # (T, N, K) -> (T, N*K): a class's samples consecutive
        query = flat[:, :, k:].reshape(t, n * q)  # (T, N, Q) -> (T, N*Q)
        # gather uint8, then convert on the device: (T, N*K) indices -> (T, N*K, c, h, w) float32
        support_x = self._images[support].to(self.device).to(torch.float32).div_(255)
        query_x = self._images[query].to(self.device).to(torch.float32).div_(255)
        if self._release is not None:
            self._release()
        return Episode(
            support_x=support_x,
            support_y=self._support_y.expand(t, -1).contiguous(),
            query_x=query_x,
            query_y=self._query_y.expand(t, -1).contiguous(),
        )
