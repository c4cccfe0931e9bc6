"""Reptile: k steps of SGD or Adam on each task's training samples, then move the initialization toward
the adapted weights.

The inner loop trains on the task's support set (``data.train_shots`` samples per class in training, as
the paper's code samples them) in mini-batches of ``inner_batch_size``, cycling through it, with plain SGD
or, as the paper's code, Adam with beta1 = 0. Nothing is back-propagated through it: the meta-gradient
is the parameter difference ``theta - phi_t``, averaged over the tasks, and the outer step is SGD with the
meta step size (``theta + epsilon (mean phi_t - theta)``), annealed linearly to 0 in the paper
(``meta.lr_schedule = "linear"``). The engine differentiates :meth:`Reptile.objective`, whose gradient is
exactly that difference, so Reptile runs batched over tasks on every strategy like the other algorithms.

Differences from the paper's code, on purpose: tasks adapt in parallel, so each starts Adam from zero
moments (the code carries Adam's second moment from task to task); the inner mini-batches take the
support samples class by class in turn (each batch holds every class equally), where the code shuffles
them. Evaluation adapts with the same optimizer and batches for ``test_inner_steps`` steps.

References:
    Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999; code:
    github.com/openai/supervised-reptile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.algorithms.base import Algorithm, Tasks
from metagrad.errors import ConfigError
from metagrad.types import Params

__all__ = ["INNER_OPTIMIZERS", "Reptile"]

INNER_OPTIMIZERS = ("sgd", "adam")

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8
"""The inner Adam's second-moment decay and epsilon (the paper's code: TensorFlow's defaults, beta1 = 0)."""


@dataclass(frozen=True, eq=False)
class Reptile(Algorithm):
    """Reptile: first order by construction; the meta-gradient is ``theta - phi`` (see the module docstring).

    Attributes:
        inner_optimizer: "sgd" or "adam" (Adam with beta1 = 0, as the paper's code).
        inner_batch_size: support samples per inner step (the paper: 10 for 5-way, 20 for 20-way); 0: all.
    """

    name = "reptile"
    outer_optimizer = "sgd"

    inner_optimizer: str = "adam"
    inner_batch_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got "
                              f"{self.inner_optimizer!r}")
        if self.inner_batch_size < 0:
            raise ConfigError(f"inner_batch_size must be >= 0 (0: the whole support set), got "
                              f"{self.inner_batch_size}")
        if not isinstance(self.inner_lr, (int, float)):
            raise ConfigError(f"Reptile takes one inner learning rate, a number (it differentiates no "
                              f"inner step, so it cannot learn rates), got {type(self.inner_lr).__name__}")
        if self.step_weights is not None:
            raise ConfigError("Reptile back-propagates through no inner step, so it cannot weigh the steps' "
                              "query losses (step_weights); drop the multi-step loss")
        object.__setattr__(self, "first_order", True)

    def inner_update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        if self.inner_optimizer == "sgd":
            return super().inner_update(params, grads, step, state)
        # Adam with beta1 = 0: the step is the gradient over the root of its running mean square
        lr = float(self.inner_lr) * math.sqrt(1 - ADAM_BETA2 ** (step + 1))  # type: ignore[arg-type]
        new = dict(params)
        for k, g in grads.items():
            square = (1 - ADAM_BETA2) * g * g
            state[k] = ADAM_BETA2 * state[k] + square if k in state else square
            new[k] = params[k] - lr * g / (state[k].sqrt() + ADAM_EPS)
        return new

    def inner_batch(self, support_y: Tensor) -> Callable[[int], Tensor] | None:
        samples, size = support_y.shape[1], self.inner_batch_size
        if not size or size >= samples:
            return None
        order = torch.arange(samples, device=support_y.device)
        if not support_y.is_floating_point() and support_y.dim() == 2:  # class labels: classes in turn
            labels = support_y[0]
            earlier = (labels[:, None] == labels[None, :]).tril(diagonal=-1).sum(dim=1)  # rank within class
            order = torch.sort(earlier * samples + order).indices
        return lambda step: order[(torch.arange(size, device=order.device) + step * size) % samples]

    def objective(self, tasks: Tasks) -> tuple[Tensor, Tensor, Tensor]:
        """``sum_k <theta_k, stop_gradient(theta_k - phi_k)>`` per task, whose gradient is ``theta - phi``
        (zero for what the inner loop leaves), with the query losses and accuracies after adaptation."""
        adapted, losses, accs = self.adapt_and_score(tasks)
        terms = [(tasks.params[k] * (tasks.params[k] - adapted.params[k]).detach()).flatten(1).sum(dim=1)
                 for k in adapted.tasked]
        surrogate = torch.stack(terms).sum(dim=0) if terms else losses * 0
        return surrogate, losses.detach(), accs


ALGORITHM = Reptile
"""What ``algorithms/registry.py`` registers of this file."""
