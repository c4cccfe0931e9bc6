"""What every meta-learning algorithm is: a frozen value holding its settings, checked once when made, and
the few choices that tell it apart, each a method its own file overrides.

* Which parameters its inner loop adapts: :meth:`Algorithm.adapted` (MAML all, ANIL the head, BOIL the body).
* Its inner update: :meth:`Algorithm.inner_update` (SGD at ``inner_lr``; Reptile's Adam) on the support
  samples :meth:`Algorithm.inner_batch` picks (all of them; Reptile's inner mini-batches).
* How its meta-gradient is formed: :meth:`Algorithm.objective`, the per-task quantity whose gradient is
  the meta-gradient: the query loss back-propagated through the inner loop (second order, or first order
  with ``first_order``), or Reptile's surrogate whose gradient is the parameter difference.
* What it learns beside the weights: learned inner rates are tensors of ``inner_lr`` that require grad
  (Meta-SGD's per element, MAML++'s LSLR per layer and step); MAML++'s per-step BatchNorm weights are
  entries of the parameters (``metagrad.per_step``). The engine differentiates and applies both.

The engine (``algorithms/meta_batch.py``) runs any algorithm on any strategy: it hands the algorithm a
:class:`Tasks`, whose ``forward`` is the strategy's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from metagrad import per_step
from metagrad.errors import ConfigError
from metagrad.functional import (
    Forward,
    check_learning_rate,
    detach_learning_rate,
    inner_loop,
    lr_at,
    sgd_step,
    task_accuracies,
    task_losses,
)
from metagrad.models import HEAD_PREFIX
from metagrad.types import Buffers, Episode, LearningRate, LossFn, Params, StepWeights

__all__ = ["BODY_PREFIX", "Adapted", "Algorithm", "RunForward", "Tasks", "body_and_head_names",
           "split_body_head"]

BODY_PREFIX = "features."
"""Names of body parameters start with this (the ``features`` submodule); the head's with ``HEAD_PREFIX``."""


class RunForward(Protocol):
    """A strategy's forward: ``module`` on inputs x (T, B, ...) of T tasks -> (T, B, ...), with the
    parameters named in ``tasked`` per task (T, ...) and the others shared."""

    def __call__(self, module: nn.Module, params: Params, buffers: Buffers, x: Tensor,
                 tasked: frozenset[str]) -> Tensor: ...


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class Tasks:
    """A meta-batch as an algorithm sees it: the model and its tensors, the episode, the parameters it
    must not adapt (frozen) and the strategy's forward."""

    model: nn.Module
    params: Params
    buffers: Buffers
    episode: Episode
    run: RunForward
    frozen: frozenset[str] = frozenset()

    def forward(self, prefix: str = "") -> Forward:
        """The forward of the submodule whose names start with ``prefix`` ("" the model), taking and
        naming parameters as the whole model does."""
        module = self.model.get_submodule(prefix.rstrip(".")) if prefix else self.model
        buffers = _strip(self.buffers, prefix)

        def forward(params: Params, x: Tensor, tasked: frozenset[str]) -> Tensor:
            return self.run(module, _strip(params, prefix), buffers, x,
                            frozenset(k[len(prefix):] for k in tasked))

        return forward


def split_body_head(model: nn.Module, params: Params) -> tuple[Params, Params]:
    """``params`` split into the body's and the head's, under the model's names.

    Raises:
        ConfigError: the model lacks ``features``/``classifier`` submodules or a parameter belongs to neither.
    """
    if not (isinstance(getattr(model, "features", None), nn.Module)
            and isinstance(getattr(model, "classifier", None), nn.Module)):
        raise ConfigError(f"this algorithm needs a model with .features (body) and .classifier (head) "
                          f"submodules; got {type(model).__name__}")
    other = [k for k in per_step.shared(params) if not k.startswith((BODY_PREFIX, HEAD_PREFIX))]
    if other:
        raise ConfigError(f"parameters {other} belong to neither {BODY_PREFIX!r} nor {HEAD_PREFIX!r}")
    return ({k: v for k, v in params.items() if k.startswith(BODY_PREFIX)},
            {k: v for k, v in params.items() if k.startswith(HEAD_PREFIX)})


def body_and_head_names(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` split into the body's and the head's (``split_body_head``'s checks), in order."""
    body, head = split_body_head(model, dict.fromkeys(names))  # type: ignore[arg-type]
    return [k for k in names if k in body], [k for k in names if k in head]


@dataclass(frozen=True, eq=False)
class Algorithm:
    """MAML, and the settings every algorithm shares.

    Attributes:
        inner_lr: inner learning rate alpha: a number, one per parameter name (e.g. Meta-SGD's learned
            tensors), or a sequence of either with one per inner step (``functional.lr_at``).
        inner_steps: inner steps per task.
        first_order: detach the inner gradients (first-order MAML, ANIL or BOIL).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` of one task, on its support and query sets; None
            for cross-entropy on class labels (labels of -100 ignored).
        step_weights: MAML++'s multi-step loss: one weight per inner step, the task's loss being the
            weighted sum of its query losses after every step, its accuracy the last step's. None: the
            last step's query loss.

    Raises:
        ConfigError: negative ``inner_steps``, a negative or non-finite ``inner_lr`` or fewer per-step
            rates than steps, ``step_weights`` not one per inner step.

    References:
        Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML.
    """

    name: ClassVar[str] = "maml"
    outer_optimizer: ClassVar[str] = "adam"  # what the training loop steps the meta-parameters with

    inner_lr: LearningRate = 0.4
    inner_steps: int = 1
    first_order: bool = False
    loss_fn: LossFn | None = None
    step_weights: StepWeights = None

    def __post_init__(self) -> None:
        if self.inner_steps < 0:
            raise ConfigError(f"inner_steps must be >= 0, got {self.inner_steps}")
        check_learning_rate(self.inner_lr, self.inner_steps)
        if self.step_weights is not None and len(self.step_weights) != self.inner_steps:
            raise ConfigError(f"step_weights gives {len(self.step_weights)} multi-step loss weights for "
                              f"{self.inner_steps} inner steps; give one per step")

    def replace(self, **changes: object) -> Algorithm:
        """A copy with ``changes``, checked as a new one is."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def detached(self) -> Algorithm:
        """The algorithm for evaluation: learned rates detached (used, not differentiated), first order
        (the same adapted values, with no graph kept for an outer backward), the last step scored."""
        return self.replace(inner_lr=detach_learning_rate(self.inner_lr), first_order=True, step_weights=None)

    # ---- the choices an algorithm's file overrides ----

    def adapted(self, model: nn.Module, names: list[str]) -> list[str]:
        """The parameter names the inner loop adapts, of ``names`` (the model's): all of them."""
        return names

    def inner_update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        """Inner step ``step`` from the support gradients of the adapted names: SGD at ``inner_lr``."""
        return sgd_step(params, grads, lr=lr_at(self.inner_lr, step))

    def inner_batch(self, support_y: Tensor) -> Callable[[int], Tensor] | None:
        """Which support samples (indices along dimension 1 of ``support_y`` (T, B, ...)) each inner step
        trains on; None: all of them."""
        return None

    def objective(self, tasks: Tasks) -> tuple[Tensor, Tensor, Tensor]:
        """``(objective, query_losses, query_accs)``, each (T,): the meta-gradient is the gradient of the
        objective's sum; here it is the query loss after the inner loop itself."""
        losses, accs = self.adapt_and_score(tasks)[1:]
        return losses, losses, accs

    # ---- the inner loop and scoring every algorithm shares ----

    def adapt(self, tasks: Tasks, on_step: Callable[[Adapted], None] | None = None) -> Adapted:
        """Each task's parameters after the inner loop on its support set; ``on_step`` sees them after
        every step.

        When only the head is adapted (ANIL) the body's features are computed once per set, and only the
        head runs in the inner loop: the result then holds the head's parameters, and its query inputs
        are the query features.
        """
        model, episode, params = tasks.model, tasks.episode, tasks.params
        keys = [k for k in self.adapted(model, list(per_step.shared(params))) if k not in tasks.frozen]
        forward, support, query = tasks.forward(), episode.support_x, episode.query_x
        if keys and all(k.startswith(HEAD_PREFIX) for k in keys) and not per_step.per_step_copies(params):
            body, params = split_body_head(model, params)
            features = tasks.forward(BODY_PREFIX)
            if not tasks.buffers and support.shape[1:] == query.shape[1:]:  # one body pass over 2T tasks
                both = features(body, torch.cat([support, query]), frozenset())
                support, query = both[:episode.num_tasks], both[episode.num_tasks:]
            else:
                support, query = (features(body, support, frozenset()), features(body, query, frozenset()))
            forward = tasks.forward(HEAD_PREFIX)
        fast, tasked = inner_loop(
            forward, params, support, episode.support_y, lr=self.inner_lr, steps=self.inner_steps, keys=keys,
            first_order=self.first_order, loss_fn=self.loss_fn, update=self.inner_update,
            batch=self.inner_batch(episode.support_y),
            on_step=None if on_step is None else lambda s, p, t: on_step(Adapted(p, t, forward, query)))
        return Adapted(fast, tasked, forward, query)

    def adapt_and_score(self, tasks: Tasks) -> tuple[Adapted, Tensor, Tensor]:
        """``(adapted, query_losses, query_accs)`` after the inner loop, or MAML++'s multi-step loss:
        ``sum_s step_weights[s] * query loss after step s`` with the last step's accuracy."""
        query_y = tasks.episode.query_y

        def score(adapted: Adapted) -> tuple[Tensor, Tensor]:
            outputs = adapted.outputs()
            return task_losses(outputs, query_y, self.loss_fn), task_accuracies(outputs, query_y)

        scores: list[tuple[Tensor, Tensor]] = []
        adapted = self.adapt(tasks, None if self.step_weights is None else lambda a: scores.append(score(a)))
        if self.step_weights is None:
            return adapted, *score(adapted)
        loss = sum(w * step_loss for w, (step_loss, _) in zip(self.step_weights, scores, strict=True))
        return adapted, loss, scores[-1][1]  # type: ignore[return-value]


@dataclass(frozen=True)
class Adapted:
    """Every task's parameters after (some of) the inner loop, and how to score them.

    Attributes:
        params: the adapted parameters under the model's names; those in ``tasked`` are per task (T, ...).
        tasked: the adapted names.
        forward: the forward that takes them (the model's, or the head's when only the head adapts).
        query: the query inputs that forward takes (images, or the body's features), (T, N*Q, ...).
    """

    params: Params
    tasked: frozenset[str]
    forward: Forward
    query: Tensor

    def outputs(self) -> Tensor:
        """(T, N*Q, ...) query outputs, e.g. logits."""
        return self.forward(self.params, self.query, self.tasked)
