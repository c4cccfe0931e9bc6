"""N-way K-shot task sampling: a whole meta-batch at once, as tensor indexing on the target device."""

from __future__ import annotations

import hashlib

import torch

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


def draw_tasks(num_tasks: int, num_classes: int, per_class: int, ways: int, samples: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of ``num_tasks`` tasks: ``ways`` distinct classes, ``samples`` distinct images of each.

    Returns:
        classes (T, N) int64 in [0, num_classes), in uniformly random order, and positions (T, N, S)
        int64 in [0, per_class) within each chosen class, in uniformly random order. On the CPU.
    """
    # The indices of the n largest of C uniform keys are n distinct classes in uniformly random order:
    # the first n entries of a random permutation, without sorting all C keys (topk, not argsort).
    classes = torch.rand(num_tasks, num_classes, generator=generator).topk(ways, dim=1).indices  # (T, N)
    # Likewise S distinct images of each chosen class: (T, N, S) positions within the class.
    positions = torch.rand(num_tasks, ways, per_class, generator=generator).topk(samples, dim=2).indices
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
        dataset: one split, images (C, S, c, h, w) uint8.
        ways: N, classes per task.
        shots: K, support images per class.
        query_shots: Q, query images per class.
        device: where the images live and the episodes are returned (default: CPU).

    Raises:
        ConfigError: a non-positive or non-integer count, fewer than 2 ways or more than the split has
            classes, or more shots + query_shots than a class has images.

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
        classes, per_class = dataset.num_classes, dataset.images_per_class
        where = f"split '{dataset.split}' of {dataset.name}"
        if ways < 2:  # every query would be labelled 0: 100% accuracy whatever the model
            raise ConfigError(f"ways={ways}: a classification task needs at least 2 classes; use ways >= 2")
        if ways > classes:
            raise ConfigError(f"ways={ways} but {where} has only {classes} classes; use ways <= {classes}")
        if shots + query_shots > per_class:
            raise ConfigError(
                f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots} but each class of "
                f"{where} has only {per_class} images; lower shots or query_shots so they sum to at most "
                f"{per_class}"
            )
        self.dataset = dataset
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._num_classes, self._per_class = classes, per_class
        # (C, S, c, h, w) -> (C*S, c, h, w): one flat index per image; moved to the device once
        self._images = dataset.images.reshape(classes * per_class, *dataset.image_shape).to(self.device)
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
        classes, samples = draw_tasks(t, self._num_classes, self._per_class, n, k + q, generator)
        flat = (classes.unsqueeze(2) * self._per_class + samples).to(self.device)  # (T, N, K+Q) image indices
        support = flat[:, :, :k].reshape(t, n * k)  # (T, N, K) -> (T, N*K): a class's samples consecutive
        query = flat[:, :, k:].reshape(t, n * q)  # (T, N, Q) -> (T, N*Q)
        # gather uint8, then convert on the device: (T, N*K) indices -> (T, N*K, c, h, w) float32
        support_x = self._images[support].to(torch.float32).div_(255)
        query_x = self._images[query].to(torch.float32).div_(255)
        return Episode(
            support_x=support_x,
            support_y=self._support_y.expand(t, -1).contiguous(),
            query_x=query_x,
            query_y=self._query_y.expand(t, -1).contiguous(),
        )
