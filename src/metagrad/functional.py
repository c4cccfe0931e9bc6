"""The pure core: run a model with given parameters, and the one inner loop every algorithm and strategy runs.

Parameters and buffers are dicts keyed by ``named_parameters()`` / ``named_buffers()`` names, and no
function here reads or writes the module's own tensors: a module only supplies the computation.
Every function returns new dicts and never mutates its inputs.

:func:`inner_loop` adapts a whole meta-batch of T tasks at once. It takes the forward as a function
(``Forward``: parameters, inputs (T, B, ...) -> outputs (T, B, ...)); the strategies of
``algorithms/strategies.py`` differ only in that function (metagrad's batched layers, ``torch.func.vmap``,
or a Python loop over tasks). Each adapted parameter gets one copy per task (``p.expand(T, ...)``, a view,
so the graph still reaches ``p``); the support loss summed over tasks depends on copy t only through task
t, so one ``torch.autograd.grad`` gives every task its own gradient. ``create_graph`` keeps that gradient
differentiable (the second-order term of the meta-gradient) unless ``first_order``.

Learning rates are a number, one per parameter name (Meta-SGD's per-element tensors, MAML++'s per-layer
scalars; learned ones may require grad), or a sequence of either, one per inner step (``lr_at``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad import per_step
from metagrad.errors import ConfigError
from metagrad.types import Buffers, LearningRate, LossFn, Params, StepLR

__all__ = ["IGNORE_INDEX", "Forward", "Update", "adapt", "check_learning_rate", "detach_learning_rate",
           "forward_with", "inner_loop", "inner_step", "learned_rates", "lr_at", "sgd_step",
           "task_accuracies", "task_losses"]

IGNORE_INDEX = -100
"""Cross-entropy's ignore index: a label that counts in neither the loss nor the accuracy."""

Forward = Callable[[Params, Tensor, frozenset[str]], Tensor]
"""``forward(params, x, tasked) -> outputs``: a module on inputs x (T, B, ...) of T tasks, giving
(T, B, ...); the names in ``tasked`` carry a leading task dimension (T, ...), the others are shared."""

Update = Callable[[Params, Params, int, dict], Params]
"""``update(params, grads, step, state) -> params``: an inner step from the gradients of the names in
``grads``; ``state`` is a dict the inner loop keeps across its steps (an inner optimizer's moments)."""


def forward_with(model: nn.Module, params: Params, buffers: Buffers, x: Tensor) -> Tensor:
    """Run ``model`` on ``x`` with the given parameters and buffers instead of its own.

    Args:
        model: supplies the computation only; its own tensors are not used for names in ``params``.
        params: name -> tensor, as ``dict(model.named_parameters())``.
        buffers: name -> tensor, as ``dict(model.named_buffers())`` (empty for the standard models).
        x: (B, C, H, W) inputs (or whatever the model takes).

    Returns:
        The model's output, e.g. (B, ways) logits.
    """
    return torch.func.functional_call(model, (params, buffers), (x,))


def lr_at(lr: LearningRate, step: int) -> StepLR:
    """The learning rate of inner step ``step``: ``lr[step]`` for a per-step sequence, else ``lr``."""
    if isinstance(lr, Sequence):
        if step >= len(lr):
            raise ValueError(f"inner_lr gives {len(lr)} per-step learning rates; step {step} has none")
        return lr[step]
    return lr


def check_learning_rate(lr: LearningRate, steps: int) -> None:
    """Raise ConfigError for a negative or non-finite float, or a per-step sequence shorter than ``steps``.

    Tensors (learned rates, Meta-SGD's or MAML++'s) are not checked: they may legitimately change sign.
    """
    if isinstance(lr, Sequence):
        if len(lr) < steps:
            raise ConfigError(f"inner_lr gives {len(lr)} per-step learning rates for {steps} inner steps")
        for one in lr:
            check_learning_rate(one, 0)
    elif isinstance(lr, (int, float)) and (not math.isfinite(lr) or lr < 0):
        raise ConfigError(f"inner_lr must be a finite non-negative number, got {lr}")


def learned_rates(lr: LearningRate) -> Params:
    """The tensors of ``lr`` that require grad (learned rates), each under a name saying where it is.

    A per-name rate is named by its parameter (``"classifier.weight"``), a per-step one by step and
    parameter (``"0.classifier.weight"``), a single learned tensor ``"lr"`` (or ``"0"`` for step 0).
    Numbers and constant tensors are left out: the result is what the meta-gradient is taken for.
    """
    per_step = isinstance(lr, Sequence)
    steps: Sequence[StepLR] = lr if isinstance(lr, Sequence) else [lr]
    found: Params = {}
    for step, one in enumerate(steps):
        named = one.items() if isinstance(one, Mapping) else [(None, one)]
        for name, rate in named:
            if isinstance(rate, Tensor) and rate.requires_grad:
                where = ([str(step)] if per_step else []) + ([name] if name is not None else [])
                found[".".join(where) or "lr"] = rate
    return found


def detach_learning_rate(lr: LearningRate) -> LearningRate:
    """``lr`` with every tensor detached (evaluation keeps no graph to learned rates)."""
    if isinstance(lr, Sequence):
        return [detach_learning_rate(one) for one in lr]  # type: ignore[misc]
    if isinstance(lr, Mapping):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in lr.items()}
    return lr.detach() if isinstance(lr, Tensor) else lr


def sgd_step(params: Params, grads: Params, *, lr: StepLR) -> Params:
    """``p - lr * g`` for each name in ``grads``; the other parameters are returned unchanged (a new dict).

    ``lr`` is one number (or scalar tensor) for all, or a learning rate per name: Meta-SGD's tensor of the
    parameter's shape, MAML++'s scalar per layer; either may require grad (learned rates). A per-name
    rate broadcasts against a per-task (T, ...) parameter. A mapping must cover every name in ``grads``.
    """
    if isinstance(lr, Mapping):
        missing = sorted(set(grads) - set(lr))
        if missing:
            raise ValueError(f"lr has no learning rate for {missing}; give one per name in grads")
        return {**params, **{k: params[k] - lr[k] * g for k, g in grads.items()}}
    return {**params, **{k: params[k] - lr * g for k, g in grads.items()}}


def task_losses(outputs: Tensor, targets: Tensor, loss_fn: LossFn | None = None) -> Tensor:
    """(T,) loss of each task: outputs (T, B, ...) against targets (T, B, ...).

    ``loss_fn`` sees one task at a time and must return a scalar. None: cross-entropy averaged over each
    task's labels other than ``IGNORE_INDEX`` (``F.cross_entropy``'s mean, task by task).

    Raises:
        ValueError: ``loss_fn`` returned something other than a scalar (e.g. ``reduction="none"``).
    """
    if loss_fn is not None:
        losses = [loss_fn(o, t) for o, t in zip(outputs, targets)]
        if any(loss.dim() != 0 for loss in losses):
            shape = next(tuple(loss.shape) for loss in losses if loss.dim() != 0)
            raise ValueError(f"loss_fn must return one scalar per task, got shape {shape}; use a reducing "
                             "loss (e.g. reduction='mean')")
        return torch.stack(losses)
    tasks, batch = targets.shape[:2]
    flat = F.cross_entropy(outputs.reshape(tasks * batch, -1), targets.reshape(-1), reduction="none",
                           ignore_index=IGNORE_INDEX).view(tasks, batch)
    counted = (targets != IGNORE_INDEX).sum(dim=1)
    return flat.sum(dim=1) / counted.clamp(min=1).to(flat.dtype)


def task_accuracies(outputs: Tensor, targets: Tensor) -> Tensor:
    """(T,) accuracy of each task over its labels other than ``IGNORE_INDEX``; NaN where the targets are
    not class labels (a regression)."""
    if targets.is_floating_point() or outputs.dim() != targets.dim() + 1:
        return outputs.new_full(outputs.shape[:1], float("nan")).detach()
    counted = targets != IGNORE_INDEX
    right = (outputs.argmax(dim=-1) == targets) & counted
    return right.sum(dim=1).to(outputs.dtype) / counted.sum(dim=1).clamp(min=1).to(outputs.dtype)


def _check_keys(params: Params, keys: Iterable[str] | None) -> list[str]:
    if keys is None:
        return list(params)
    keys = list(keys)
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"keys {missing} are not parameter names; valid names include {sorted(params)[:4]}")
    return keys


def inner_loop(
    forward: Forward,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    lr: LearningRate,
    steps: int,
    keys: Iterable[str] | None = None,
    first_order: bool = False,
    loss_fn: LossFn | None = None,
    update: Update | None = None,
    batch: Callable[[int], Tensor] | None = None,
    on_step: Callable[[int, Params, frozenset[str]], None] | None = None,
) -> tuple[Params, frozenset[str]]:
    """Adapt ``params`` to each of T tasks with ``steps`` gradient steps on its support set: every
    algorithm's inner loop, on every strategy.

    Pure: returns new parameters and never mutates ``params``. The result stays differentiable with
    respect to ``params`` (through the inner gradients too unless ``first_order``), so a query loss
    computed with it back-propagates the meta-gradient.

    Args:
        forward: the module's forward over the meta-batch (see ``Forward``).
        params: name -> tensor, shared by all tasks. ``"<name>@step<k>"`` entries are MAML++'s per-step
            BatchNorm weights (``metagrad.per_step``): step k uses copy k, and they are not adapted.
        x: (T, B, ...) support inputs; y: (T, B, ...) their targets.
        lr: the inner learning rate (see the module docstring); read by the default update only.
        steps: inner steps (0 returns the parameters unchanged).
        keys: names the inner loop adapts; None = all.
        first_order: detach the inner gradients (first-order MAML); otherwise keep their graph.
        loss_fn: one task's ``loss_fn(outputs, targets) -> scalar``; None for cross-entropy.
        update: the inner step (``Update``); None for SGD, ``p - lr_at(lr, step) * g``.
        batch: ``batch(step)`` -> indices of the B support samples step ``step`` trains on; None: all.
        on_step: called after each step with its index, the parameters and the per-task names.

    Returns:
        ``(adapted, tasked)``: the adapted parameters under the model's names (per-task (T, ...) for the
        names in ``tasked``, the adapted ones; empty after 0 steps) and ``tasked``.

    Raises:
        ValueError: negative ``steps``, mismatched support shapes, or bad ``keys``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"support inputs {tuple(x.shape)} and targets {tuple(y.shape)} differ in tasks or "
                         "samples")
    keys = _check_keys(per_step.at_step(params, 0), per_step.adapted_keys(params, keys))
    fast = dict(per_step.at_step(params, 0))
    if steps == 0 or not keys:
        return fast, frozenset()
    tasked = frozenset(keys)
    state: dict = {}
    # enable_grad and fresh leaves for constants let this run at test time too (under no_grad, or on
    # detached parameters); they change nothing when params already require grad.
    with torch.enable_grad():
        fast.update({k: fast[k].expand(x.shape[0], *fast[k].shape) for k in keys})  # a copy per task: views
        for step in range(steps):
            current = {**fast, **per_step.copies_at(params, step)}
            current.update({k: current[k].detach().requires_grad_() for k in keys
                            if not current[k].requires_grad})
            xs, ys = (x, y) if batch is None else (x[:, batch(step)], y[:, batch(step)])
            loss = task_losses(forward(current, xs, tasked), ys, loss_fn).sum()
            # A parameter the loss does not use gets a zero gradient (it stays where it is).
            found = torch.autograd.grad(loss, [current[k] for k in keys], create_graph=not first_order,
                                        allow_unused=True, materialize_grads=True)
            grads = {k: g.detach() if first_order else g for k, g in zip(keys, found)}
            stepped = (update or _sgd_update(lr))(current, grads, step, state)
            fast = {k: stepped[k] for k in fast}
            if on_step is not None:
                on_step(step, fast, tasked)
    return fast, tasked


def _sgd_update(lr: LearningRate) -> Update:
    return lambda params, grads, step, state: sgd_step(params, grads, lr=lr_at(lr, step))


def adapt(
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    support_x: Tensor,
    support_y: Tensor,
    *,
    inner_lr: LearningRate,
    steps: int,
    first_order: bool = False,
    keys: Iterable[str] | None = None,
    loss_fn: LossFn | None = None,
) -> Params:
    """Adapt ``params`` to one task with ``steps`` gradient steps on its support set (MAML's inner loop).

    :func:`inner_loop` on a meta-batch of one task.

    Args:
        model: supplies the computation.
        params: name -> tensor, the initialization being meta-learned.
        buffers: name -> tensor, passed through.
        support_x: (N*K, C, H, W) support images of one task (or any inputs the model takes).
        support_y: (N*K,) int64 labels in [0, N) (or any targets ``loss_fn`` takes).
        inner_lr, steps, first_order, keys, loss_fn: as for :func:`inner_loop`.

    Returns:
        Adapted parameters: a new dict with every name of the model.

    Example:
        >>> params = dict(model.named_parameters())
        >>> fast = adapt(model, params, {}, sx, sy, inner_lr=0.4, steps=1)
        >>> F.cross_entropy(forward_with(model, fast, {}, qx), qy).backward()  # meta-gradient in p.grad

    References:
        Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML.
    """
    if support_x.shape[0] != support_y.shape[0]:
        raise ValueError(
            f"support_x has {support_x.shape[0]} samples but support_y has {support_y.shape[0]} labels"
        )

    def forward(current: Params, x: Tensor, tasked: frozenset[str]) -> Tensor:
        own = {k: v[0] if k in tasked else v for k, v in current.items()}
        return forward_with(model, own, buffers, x[0])[None]

    fast, tasked = inner_loop(forward, params, support_x[None], support_y[None], lr=inner_lr, steps=steps,
                              keys=keys, first_order=first_order, loss_fn=loss_fn)
    return {k: v[0] if k in tasked else v for k, v in fast.items()}


def inner_step(model: nn.Module, params: Params, buffers: Buffers, x: Tensor, y: Tensor, *, inner_lr: StepLR,
               first_order: bool = False, keys: Iterable[str] | None = None,
               loss_fn: LossFn | None = None) -> Params:
    """One gradient step on the loss of one task's ``(x, y)``: :func:`adapt` with ``steps=1``."""
    return adapt(model, params, buffers, x, y, inner_lr=inner_lr, steps=1, first_order=first_order, keys=keys,
                 loss_fn=loss_fn)
