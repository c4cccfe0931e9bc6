"""MAML and first-order MAML: adapt every parameter on the support set, score the query set.

The per-task loss below is all of MAML; ``metagrad.algorithms.meta_batch_loss`` averages it over a
meta-batch, vmapped over tasks or looped. First-order MAML is the same function with
``loop.first_order`` True (inner gradients detached).

References:
    Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.functional import adapt, forward_with
from metagrad.types import Buffers, LossFn, Params, StepWeights

if TYPE_CHECKING:
    from metagrad.algorithms.inner_loop import InnerLoop

__all__ = ["accuracy", "is_classification", "maml_task_loss", "query_metrics", "weighted_over_steps"]


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of ``labels`` (B,) that ``logits`` (B, N) rank first, as a float scalar tensor."""
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def is_classification(outputs: Tensor, targets: Tensor) -> bool:
    """True where accuracy means something: integer labels (B,) and class scores (B, N)."""
    return not targets.is_floating_point() and outputs.dim() == targets.dim() + 1


def query_metrics(outputs: Tensor, targets: Tensor, loss_fn: LossFn | None) -> tuple[Tensor, Tensor]:
    """``(loss, accuracy)`` of one task's query set; accuracy is NaN where targets are not class labels."""
    loss = (loss_fn or F.cross_entropy)(outputs, targets)
    if is_classification(outputs, targets):
        return loss, accuracy(outputs, targets)
    return loss, outputs.new_full((), float("nan")).detach()


def weighted_over_steps(
    adapt_with: Callable[[Callable[[int, Params], None] | None], Params],
    score: Callable[[Params], tuple[Tensor, Tensor]],
    step_weights: StepWeights,
) -> tuple[Tensor, Tensor]:
    """``(query loss, accuracy)`` after the inner loop, or MAML++'s multi-step loss.

    Args:
        adapt_with: runs the inner loop with an ``on_step`` callback (``functional.adapt``'s) and returns
            the adapted parameters.
        score: ``(loss, accuracy)`` of adapted parameters on the query set (scalars, or (T,) per task).
        step_weights: None: the last step's loss. Else one weight per step (``InnerLoop`` checks
            that): the loss is ``sum_s step_weights[s] * loss after step s`` (the reference code's
            ``few_shot_learning_system.py``, ``forward``), the accuracy the last step's.
    """
    if step_weights is None:
        return score(adapt_with(None))
    scores: list[tuple[Tensor, Tensor]] = []
    adapt_with(lambda step, adapted: scores.append(score(adapted)))
    loss = sum(w * step_loss for w, (step_loss, _) in zip(step_weights, scores, strict=True))
    return loss, scores[-1][1]


def maml_task_loss(
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    loop: InnerLoop,
    *,
    keys: Iterable[str] | None = None,
    under_vmap: bool = False,
) -> tuple[Tensor, Tensor]:
    """Query loss and accuracy of one task after adapting ``params`` on its support set.

    Args:
        model: supplies the computation (its own tensors are not used).
        params: name -> tensor, the meta-learned initialization.
        buffers: name -> tensor, passed through.
        support_x: (N*K, C, H, W) support images.
        support_y: (N*K,) int64 labels in [0, N).
        query_x: (N*Q, C, H, W) query images.
        query_y: (N*Q,) int64 labels.
        loop: the inner loop's settings (``InnerLoop``: learning rate, steps, first order, loss, MAML++'s
            multi-step loss weights); its ``algorithm`` is not read.
        keys: parameter names the inner loop adapts; None = all.
        under_vmap: True when vmapped over tasks (``torch.func.grad`` in the inner loop).

    Returns:
        ``(query_loss, query_acc)``: scalar query loss, differentiable w.r.t. ``params``, and scalar
        accuracy (NaN where the targets are not class labels).
    """
    def adapt_with(on_step: Callable[[int, Params], None] | None) -> Params:
        return adapt(model, params, buffers, support_x, support_y, inner_lr=loop.inner_lr,
                     steps=loop.inner_steps, first_order=loop.first_order, keys=keys, under_vmap=under_vmap,
                     loss_fn=loop.loss_fn, on_step=on_step)

    def score(adapted: Params) -> tuple[Tensor, Tensor]:
        outputs = forward_with(model, adapted, buffers, query_x)  # (N*Q, N)
        return query_metrics(outputs, query_y, loop.loss_fn)

    return weighted_over_steps(adapt_with, score, loop.step_weights)
