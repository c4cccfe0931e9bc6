"""Types shared across metagrad. Aliases are named here once and imported everywhere else."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""Parameters keyed by ``nn.Module.named_parameters()`` names."""

Buffers = dict[str, Tensor]
"""Buffers keyed by ``nn.Module.named_buffers()`` names (kept apart from parameters)."""

Metrics = dict[str, float]

StepLR = float | Tensor | Mapping[str, float | Tensor]
"""One inner step's learning rate: a number (or scalar tensor), or one per parameter name."""

LearningRate = StepLR | Sequence[StepLR]
"""An inner learning rate: one step's (Meta-SGD's per-element tensors, MAML++'s per-layer scalars), or a
sequence with one per inner step."""

StepWeights = Sequence[float] | None
"""MAML++'s multi-step loss (MSL): one weight per inner step, the query loss being the weighted sum of the
query losses after each step; None for the last step's query loss alone (MAML)."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> scalar`` of one task, e.g. ``F.cross_entropy`` or ``F.mse_loss``."""


@dataclass(frozen=True)
class Episode:
    """A meta-batch of ``T`` few-shot tasks (episodes), each N ways x K shots plus Q queries per class.

    Labels of each task are ``0..N-1``, assigned to classes at random per task. Within a task the
    support (and the query) samples of one class are consecutive: label order is
    ``[0]*K + [1]*K + ... + [N-1]*K`` after a random class-to-label assignment.

    Attributes:
        support_x: (T, N*K, C, H, W) float images.
        support_y: (T, N*K) int64 labels in ``[0, N)``.
        query_x: (T, N*Q, C, H, W) float images.
        query_y: (T, N*Q) int64 labels in ``[0, N)``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``i``-th task as unbatched ``(support_x, support_y, query_x, query_y)``."""
        return self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i]

    def slice(self, start: int, stop: int) -> Episode:
        """Tasks ``start:stop`` as a smaller meta-batch (used to split work across processes)."""
        return Episode(
            self.support_x[start:stop], self.support_y[start:stop],
            self.query_x[start:stop], self.query_y[start:stop],
        )

    def to(self, device: torch.device | str) -> Episode:
        return Episode(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))
