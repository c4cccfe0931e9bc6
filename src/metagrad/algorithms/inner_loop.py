"""The registered algorithms and ``InnerLoop``: how each task of a meta-batch adapts and is scored.

The per-task losses (``maml_task_loss``, ``anil_task_loss``) and their batched forms take one
``InnerLoop`` instead of the same keywords each; the public functions of ``meta_batch`` keep their
keyword signatures and build one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from metagrad.algorithms.anil import anil_task_loss
from metagrad.algorithms.maml import maml_task_loss
from metagrad.errors import ConfigError
from metagrad.functional import check_learning_rate, detach_learning_rate
from metagrad.types import LearningRate, LossFn, StepWeights

__all__ = ["ALGORITHMS", "Algorithm", "InnerLoop", "TaskLoss", "check_algorithm"]

TaskLoss = Callable[..., tuple[Tensor, Tensor]]
"""``f(model, params, buffers, support_x, support_y, query_x, query_y, loop, *, keys=None,
under_vmap=False) -> (query_loss, query_acc)`` for one task; ``loop`` is an ``InnerLoop``."""


@dataclass(frozen=True)
class Algorithm:
    """A registered meta-learning algorithm.

    Attributes:
        task_loss: the per-task loss (see ``TaskLoss``).
        first_order: True if the algorithm is first order whatever the caller asks ("fomaml").
    """

    task_loss: TaskLoss
    first_order: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(maml_task_loss),
    "fomaml": Algorithm(maml_task_loss, first_order=True),
    "anil": Algorithm(anil_task_loss),
}
"""Algorithm name -> definition: "maml" (second order unless asked otherwise), "fomaml", "anil"."""


def check_algorithm(name: str) -> None:
    """Raise ``ConfigError`` naming the valid algorithms unless ``name`` is one of ``ALGORITHMS``."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(sorted(ALGORITHMS))}")


@dataclass(frozen=True, eq=False)
class InnerLoop:
    """How each task adapts on its support set and is scored on its query set.

    Every instance is checked when it is made (the constructor, ``dataclasses.replace`` and
    ``detached`` alike), so the functions that take one do not check it again.

    Attributes:
        algorithm: a name in ``ALGORITHMS`` ("maml", "fomaml", "anil"). The meta-batch functions run
            its task loss; a per-task loss called directly is its own algorithm and reads only the
            other settings.
        inner_lr: inner learning rate alpha: a number, one per parameter name (e.g. Meta-SGD's
            learned tensors), or a sequence of either with one per inner step (``functional.lr_at``).
        inner_steps: inner gradient steps per task.
        first_order: detach the inner gradients (first-order MAML or ANIL). Resolved when made:
            True for "fomaml" whatever is passed, and None counts as False.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for one task, on the support and the query
            set; None for mean cross-entropy on class labels.
        step_weights: MAML++'s multi-step loss: one weight per inner step, the task's loss being the
            weighted sum of its query losses after every step (``maml.weighted_over_steps``), its
            accuracy the last step's. None (MAML): the last step's query loss.

    Raises:
        ConfigError: unknown algorithm, negative ``inner_steps``, a negative or non-finite
            ``inner_lr`` or fewer per-step rates than steps (``functional.check_learning_rate``),
            ``step_weights`` not one per inner step.
    """

    algorithm: str
    inner_lr: LearningRate
    inner_steps: int
    first_order: bool = False
    loss_fn: LossFn | None = None
    step_weights: StepWeights = None

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm)
        if self.inner_steps < 0:
            raise ConfigError(f"inner_steps must be >= 0, got {self.inner_steps}")
        check_learning_rate(self.inner_lr, self.inner_steps)
        if self.step_weights is not None and len(self.step_weights) != self.inner_steps:
            raise ConfigError(f"step_weights gives {len(self.step_weights)} multi-step loss weights for "
                              f"{self.inner_steps} inner steps; give one per step")
        object.__setattr__(self, "first_order", self.spec.first_order or bool(self.first_order))

    @property
    def spec(self) -> Algorithm:
        """The registered definition of ``algorithm``."""
        return ALGORITHMS[self.algorithm]

    def detached(self) -> InnerLoop:
        """The loop for evaluation: learned rates detached (used, not differentiated) and first order.

        First- and second-order adaptation compute the same values; the first-order one keeps no graph
        for an outer backward.
        """
        return dataclasses.replace(self, inner_lr=detach_learning_rate(self.inner_lr), first_order=True)
