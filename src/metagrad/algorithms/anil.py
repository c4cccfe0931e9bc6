"""ANIL: MAML whose inner loop adapts only the head, on body features computed once per task.

The body (``model.features``) keeps the meta-learned weights inside a task, so its output on the
support set and on the query set is computed once; the inner loop runs on the linear head
(``model.classifier``) alone. The body still receives meta-gradients through the query loss. This is
exactly MAML with ``keys`` = the head's parameter names (a test checks it), only cheaper.

BatchNorm in the body normalizes the support set and the query set each with its own statistics, as
MAML's separate support and query forwards do.

References:
    Raghu et al. 2020, "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of
    MAML", ICLR.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from metagrad.algorithms.maml import query_metrics, weighted_over_steps
from metagrad.errors import ConfigError
from metagrad.functional import adapt, forward_with
from metagrad.models import HEAD_PREFIX
from metagrad.types import Buffers, LearningRate, Params

if TYPE_CHECKING:
    from metagrad.algorithms.inner_loop import InnerLoop

__all__ = ["BODY_PREFIX", "anil_task_loss", "split_body_head"]

BODY_PREFIX = "features."
"""Names of body parameters start with this (the ``features`` submodule)."""


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def split_body_head(model: nn.Module, params: Params) -> tuple[Params, Params]:
    """Split ``params`` into the body's and the head's, with the submodule prefix removed.

    Raises:
        ConfigError: the model lacks ``features``/``classifier`` submodules or a parameter belongs to neither.
    """
    if not (isinstance(getattr(model, "features", None), nn.Module)
            and isinstance(getattr(model, "classifier", None), nn.Module)):
        raise ConfigError(
            f"ANIL needs a model with .features and .classifier submodules; got {type(model).__name__}"
        )
    other = [k for k in params if not k.startswith((BODY_PREFIX, HEAD_PREFIX))]
    if other:
        raise ConfigError(f"ANIL: parameters {other} belong to neither {BODY_PREFIX!r} nor {HEAD_PREFIX!r}")
    return _strip(params, BODY_PREFIX), _strip(params, HEAD_PREFIX)


def _head_rates(lr: LearningRate) -> LearningRate:
    """Rates keyed by the whole model's names, re-keyed by the head's own (the head runs on its own)."""
    if isinstance(lr, Sequence):
        return [_head_rates(one) for one in lr]
    if isinstance(lr, Mapping):
        return _strip(dict(lr), HEAD_PREFIX)
    return lr


def anil_task_loss(
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
    """Query loss and accuracy of one task after adapting only the head on the support features.

    Args:
        model: a model with ``features`` (body, (B, ...) -> (B, D)) and ``classifier`` (head) submodules.
        params: name -> tensor for the whole model.
        buffers: name -> tensor for the whole model.
        support_x: (N*K, C, H, W) support images.
        support_y: (N*K,) int64 labels.
        query_x: (N*Q, C, H, W) query images.
        query_y: (N*Q,) int64 labels.
        loop: the inner loop's settings (``InnerLoop``), as for ``maml_task_loss``; its steps adapt the
            head, its learning rates are keyed by the whole model's names.
        keys: full parameter names the inner loop may adapt (None: all); of these, the head's are adapted.
        under_vmap: True when vmapped over tasks.

    Returns:
        ``(query_loss, query_acc)`` scalars; the loss is differentiable w.r.t. body and head parameters.
    """
    body, head = split_body_head(model, params)
    body_buffers, head_buffers = _strip(buffers, BODY_PREFIX), _strip(buffers, HEAD_PREFIX)
    support_f = forward_with(model.features, body, body_buffers, support_x)  # (N*K, D)
    query_f = forward_with(model.features, body, body_buffers, query_x)  # (N*Q, D)
    head_keys = list(head) if keys is None else [k for k in head if HEAD_PREFIX + k in set(keys)]

    def adapt_with(on_step: Callable[[int, Params], None] | None) -> Params:
        return adapt(model.classifier, head, head_buffers, support_f, support_y, keys=head_keys,
                     inner_lr=_head_rates(loop.inner_lr), steps=loop.inner_steps,
                     first_order=loop.first_order, under_vmap=under_vmap, loss_fn=loop.loss_fn,
                     on_step=on_step)

    def score(adapted: Params) -> tuple[Tensor, Tensor]:
        return query_metrics(forward_with(model.classifier, adapted, head_buffers, query_f), query_y,
                             loop.loss_fn)

    return weighted_over_steps(adapt_with, score, loop.step_weights)
