"""The pure core: run a model with given parameters, take inner-loop gradient steps.

Parameters and buffers are dicts keyed by ``named_parameters()`` / ``named_buffers()`` names, and no
function here reads or writes the module's own tensors: a module only supplies the computation.
Every function returns new dicts and never mutates its inputs.

``gradient_step`` is the inner loop's one update rule, ``p - lr * grad``, on a loss given as a closure
over the parameters; ``inner_step`` and ``adapt`` apply it to a model's loss on a support set, and the
batched networks (``algorithms/batched.py``) to all tasks' summed loss. Learning rates are a number, one
per parameter name (Meta-SGD's per-element tensors, MAML++'s per-layer scalars; learned ones may require
grad), or a sequence of either, one per inner step (``lr_at``). Two ways to take the gradient, chosen by
``under_vmap``:

* ``under_vmap=False`` (the per-task reference path, and the batched one): ``torch.autograd.grad`` with
  ``create_graph=not first_order``.
* ``under_vmap=True`` (inside ``torch.func.vmap`` over tasks): ``torch.func.grad``, because
  ``torch.autograd.grad`` cannot differentiate through vmap's batched tensors. ``torch.func.grad`` always
  returns gradients that the enclosing autograd can differentiate again (second order); first order
  detaches them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad import per_step, vmap_exact
from metagrad.errors import ConfigError
from metagrad.types import Buffers, LearningRate, LossFn, Params, StepLR

__all__ = ["adapt", "check_learning_rate", "detach_learning_rate", "forward_with", "gradient_step",
           "inner_step", "learned_rates", "lr_at", "sgd_step", "support_loss"]


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


def support_loss(model: nn.Module, params: Params, buffers: Buffers, x: Tensor, y: Tensor,
                 loss_fn: LossFn | None = None) -> Tensor:
    """``loss_fn`` (default: mean cross-entropy) of ``model`` with ``params`` on ``x`` (B, ...) and ``y``."""
    return (loss_fn or F.cross_entropy)(forward_with(model, params, buffers, x), y)


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
    found: Params = {}
    for step, one in enumerate(lr if per_step else [lr]):
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


def gradient_step(
    loss_of: Callable[[Params], Tensor],
    params: Params,
    *,
    lr: StepLR,
    keys: Iterable[str] | None = None,
    first_order: bool = False,
    under_vmap: bool = False,
) -> Params:
    """The inner loop's one update rule: ``p - lr * d loss_of(params) / dp`` for ``p`` in ``keys``.

    Every inner loop in metagrad takes its steps here (the per-task loop, vmap, the batched networks,
    evaluation); the learn2learn layer's ``adapt`` applies the same ``sgd_step``.

    Args:
        loss_of: the loss as a function of the parameters (a closure over the data).
        params: current parameters; not modified. On the batched path adapted ones carry a task
            dimension (T, ...) and ``loss_of`` sums the tasks' losses, so each copy gets its task's gradient.
        lr: one step's learning rate (see ``sgd_step``).
        keys: names to update; None updates all. The others are returned unchanged (the same tensors).
        first_order: detach the gradient (first-order MAML); otherwise keep its graph so that the
            meta-gradient includes the second-order term.
        under_vmap: True inside ``torch.func.vmap``: ``torch.func.grad`` takes the gradient, since
            ``torch.autograd.grad`` cannot differentiate through vmap's batched tensors.

    Returns:
        A new dict holding every name of ``params``.

    Raises:
        ValueError: a name in ``keys`` is not in ``params``, or ``keys`` is empty.
    """
    keys = _check_keys(params, keys)
    if under_vmap:
        def on_keys(adapted: Params) -> tuple[Tensor, list[Tensor]]:
            # BatchNorm statistics recorded inside grad leave it as its aux output (vmap_exact.aux_scope).
            with vmap_exact.aux_scope() as stats:
                loss = loss_of({**params, **adapted})
            return loss, stats

        grads, stats = torch.func.grad(on_keys, has_aux=True)({k: params[k] for k in keys})
        vmap_exact.extend_stats(stats)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        return sgd_step(params, grads, lr=lr)

    # enable_grad and fresh leaves for constants let this run at test time too (under no_grad, or on
    # detached parameters); they change nothing when params already require grad.
    with torch.enable_grad():
        leaves = {k: p if (p := params[k]).requires_grad else p.detach().requires_grad_() for k in keys}
        loss = loss_of({**params, **leaves})
        # create_graph keeps the gradient differentiable, so the outer loss sees d(grad)/d(params):
        # that is the second-order term. First order drops it (the gradient is a constant).
        # A parameter the loss does not use gets a zero gradient (it stays where it is).
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=not first_order,
                                    allow_unused=True, materialize_grads=True)
        return sgd_step({**params, **leaves}, dict(zip(keys, grads)), lr=lr)


def _check_keys(params: Params, keys: Iterable[str] | None) -> list[str]:
    if keys is None:
        return list(params)
    keys = list(keys)
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"keys {missing} are not parameter names; valid names include {sorted(params)[:4]}")
    if not keys:
        raise ValueError("keys is empty, so the inner loop would adapt nothing; pass None to adapt all")
    return keys


def inner_step(
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    x: Tensor,
    y: Tensor,
    *,
    inner_lr: StepLR,
    first_order: bool = False,
    keys: Iterable[str] | None = None,
    under_vmap: bool = False,
    loss_fn: LossFn | None = None,
) -> Params:
    """One gradient step on the loss of ``(x, y)``: ``p - inner_lr * grad`` for ``p`` in ``keys``.

    Args:
        model: supplies the computation.
        params: current parameters; not modified.
        buffers: buffers passed through to ``forward_with``.
        x: (B, C, H, W) support inputs of one task.
        y: (B,) int64 support labels.
        inner_lr: the step's learning rate alpha: a number, or one per parameter name (``sgd_step``).
        first_order: detach the inner gradient (first-order MAML); otherwise keep its graph so the
            meta-gradient includes the second-order term.
        keys: names of the parameters to adapt (ANIL: the head's); None adapts all. The others are
            returned unchanged (the same tensors).
        under_vmap: True when called inside ``torch.func.vmap``; uses ``torch.func.grad``.
        loss_fn: ``loss_fn(outputs, y) -> scalar`` for one task; None for mean cross-entropy.

    Returns:
        A new dict holding every name of ``params``.

    Raises:
        ValueError: a name in ``keys`` is not in ``params``, or ``keys`` is empty.
    """
    def loss_of(current: Params) -> Tensor:
        return support_loss(model, current, buffers, x, y, loss_fn)

    return gradient_step(loss_of, params, lr=inner_lr, keys=keys, first_order=first_order,
                         under_vmap=under_vmap)


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
    under_vmap: bool = False,
    loss_fn: LossFn | None = None,
    on_step: Callable[[int, Params], None] | None = None,
) -> Params:
    """Adapt ``params`` to one task with ``steps`` gradient steps on its support set (MAML's inner loop).

    Pure: returns new parameters and never mutates ``params``. The result stays differentiable with
    respect to ``params`` (through the inner gradients too unless ``first_order``), so a query loss
    computed with it back-propagates the meta-gradient.

    Args:
        model: supplies the computation.
        params: name -> tensor, the initialization being meta-learned. ``"<name>@step<k>"`` entries
            are MAML++'s per-step BatchNorm weights (``metagrad.per_step``): step k uses copy k (later
            steps the last), and they are not adapted.
        buffers: name -> tensor, passed through.
        support_x: (N*K, C, H, W) support images of one task (or any inputs the model takes).
        support_y: (N*K,) int64 labels in [0, N) (or any targets ``loss_fn`` takes).
        inner_lr: inner learning rate alpha: a number, one per parameter name, or a sequence of
            either with one per step (see the module docstring).
        steps: number of inner gradient steps (0 returns the parameters unchanged).
        first_order: first-order approximation (inner gradients detached).
        keys: parameter names the inner loop adapts; None = all (MAML), the head's = ANIL.
        under_vmap: True inside ``torch.func.vmap`` (see the module docstring).
        loss_fn: ``loss_fn(outputs, support_y) -> scalar``; None for mean cross-entropy.
        on_step: called after each step with its index (0-based) and the parameters it produced (MAML++'s
            multi-step loss scores the query set there); None for nothing.

    Returns:
        Adapted parameters: a new dict with every name of ``params`` (with per-step copies: every name
        of the model, those copies' the last step's).

    Raises:
        ValueError: negative ``steps``, mismatched support shapes, or bad ``keys``.

    Example:
        >>> params = dict(model.named_parameters())
        >>> fast = adapt(model, params, {}, sx, sy, inner_lr=0.4, steps=1)
        >>> F.cross_entropy(forward_with(model, fast, {}, qx), qy).backward()  # meta-gradient in p.grad

    References:
        Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if support_x.shape[0] != support_y.shape[0]:
        raise ValueError(
            f"support_x has {support_x.shape[0]} samples but support_y has {support_y.shape[0]} labels"
        )
    # MAML++'s per-step BatchNorm weights (per_step.py): step k runs with copy k, which is not adapted.
    keys = _check_keys(per_step.at_step(params, 0), per_step.adapted_keys(params, keys))
    adapted = dict(per_step.at_step(params, 0))
    for step in range(steps):
        adapted = inner_step(
            model, {**adapted, **per_step.copies_at(params, step)}, buffers, support_x,
            support_y, inner_lr=lr_at(inner_lr, step),
            first_order=first_order, keys=keys, under_vmap=under_vmap, loss_fn=loss_fn,
        )
        if on_step is not None:
            on_step(step, adapted)
    return adapted
