"""MAML, first-order MAML and ANIL on a whole meta-batch with the task-batched standard models.

The vmap path runs each task's computation under ``torch.func.vmap``; this one folds the task dimension
into the layers themselves (``metagrad.models.batched``): grouped convolutions, a fused per-task
BatchNorm and batched matrix products, differentiated with plain ``torch.autograd``. The numbers are the
per-task loop's (the tests in ``tests/algorithms`` compare all paths against a hand-unrolled reference).

Inner loop: each adapted parameter is expanded to one copy per task (``p.expand(T, ...)``, a view, so
the graph still reaches the meta-parameter ``p``). The support loss summed over tasks depends on copy t
only through task t, so one gradient of that sum gives every task its own gradient: the step is
``functional.gradient_step``, the one every inner loop takes.

ANIL runs the body once on all tasks' support and query images (shared weights; per-task, per-set
BatchNorm statistics as in ``anil_task_loss``), then adapts only the head on those features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import per_step
from metagrad.algorithms.maml import is_classification, weighted_over_steps
from metagrad.functional import gradient_step, lr_at
from metagrad.models.batched import BatchedPlan, task_batched_body, task_batched_forward, task_batched_head
from metagrad.types import Episode, LearningRate, LossFn, Params, StepWeights

__all__ = ["CPU_CHUNK_ELEMENTS", "batched_anil", "batched_maml", "tasks_per_chunk"]

HEAD_KEYS = ("classifier.weight", "classifier.bias")

CPU_CHUNK_ELEMENTS = 1 << 19
"""On CPU, tasks are batched in chunks whose first-layer activations (support and query) stay under
about this many elements (2 MB in float32): it bounds the memory of the chunk's graph and of BatchNorm's
double backward at no measured cost in speed (docs/PERFORMANCE.md, "--tasks-per-chunk"). On CUDA the
whole meta-batch is one chunk (a GPU needs large batches to be busy)."""


def _task_loss(outputs: Tensor, targets: Tensor, loss_fn: LossFn | None) -> Tensor:
    """(T,) loss of each task: outputs (T, B, ...) against targets (T, B, ...)."""
    if loss_fn is not None:  # a user's loss sees one task at a time, as on the per-task loop
        return torch.stack([loss_fn(o, t) for o, t in zip(outputs, targets)])
    tasks, batch, ways = outputs.shape  # mean cross-entropy of (T, B, N) logits and (T, B) labels
    return F.cross_entropy(outputs.reshape(tasks * batch, ways), targets.reshape(-1),
                           reduction="none").view(tasks, batch).mean(dim=1)


def _task_acc(outputs: Tensor, targets: Tensor) -> Tensor:
    """(T,) accuracy of each task, NaN where the targets are not class labels."""
    if not is_classification(outputs[0], targets[0]):
        return outputs.new_full(outputs.shape[:1], float("nan")).detach()
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean(dim=1)


def _adapt(forward: Callable[[Params, Tensor], Tensor], params: Params, keys: Sequence[str], x: Tensor,
           y: Tensor, *, inner_lr: LearningRate, steps: int, first_order: bool,
           loss_fn: LossFn | None, on_step: Callable[[int, Params], None] | None = None) -> Params:
    """``steps`` SGD steps of every task at once; adapted tensors come back per task, (T, ...)."""
    tasks = x.shape[0]
    keys = per_step.adapted_keys(params, keys) or []  # BNWB's per-step copies are not adapted
    fast = dict(per_step.at_step(params, 0))

    def loss_of(current: Params) -> Tensor:
        return _task_loss(forward(current, x), y, loss_fn).sum()  # task t's loss sees only copy t

    for step in range(steps):
        # one copy per task: a view (T, ...), so the graph still reaches the shared parameter
        fast.update({k: fast[k] if fast[k].dim() > params[k].dim() else fast[k].expand(tasks, *fast[k].shape)
                     for k in keys})
        fast = gradient_step(loss_of, {**fast, **per_step.copies_at(params, step)}, lr=lr_at(inner_lr, step),
                             keys=keys, first_order=first_order)
        if on_step is not None:
            on_step(step, fast)
    return fast


def tasks_per_chunk(plan: BatchedPlan, params: Params, episode: Episode) -> int:
    """How many tasks to batch at once: all on GPU, on CPU as many as ``CPU_CHUNK_ELEMENTS`` allows."""
    if episode.support_x.device.type != "cpu":
        return episode.num_tasks
    first = plan.steps[0] if plan.steps[0].kind != "flatten_input" else plan.steps[1]
    if first.kind == "conv":
        height, width = episode.support_x.shape[-2:]
        channels = params[first.prefix + "conv.weight"].shape[-4]
        per_image = channels * -(-height // first.stride) * -(-width // first.stride)
    else:
        per_image = params[first.prefix + "0.weight"].shape[-2]
    per_task = (episode.support_x.shape[1] + episode.query_x.shape[1]) * per_image
    return max(1, min(episode.num_tasks, CPU_CHUNK_ELEMENTS // per_task))


def batched_maml(plan: BatchedPlan, params: Params, episode: Episode, *, inner_lr: LearningRate,
                 inner_steps: int, first_order: bool, loss_fn: LossFn | None = None,
                 step_weights: StepWeights = None) -> tuple[Tensor, Tensor]:
    """Per-task query losses (T,) and accuracies (T,) of MAML (all parameters adapted)."""
    def adapt_with(on_step: Callable[[int, Params], None] | None) -> Params:
        return _adapt(lambda p, x: task_batched_forward(plan, p, x), params, list(params),
                      episode.support_x, episode.support_y, inner_lr=inner_lr, steps=inner_steps,
                      first_order=first_order, loss_fn=loss_fn, on_step=on_step)

    def score(fast: Params) -> tuple[Tensor, Tensor]:
        logits = task_batched_forward(plan, fast, episode.query_x)  # (T, N*Q, N)
        return _task_loss(logits, episode.query_y, loss_fn), _task_acc(logits, episode.query_y)

    return weighted_over_steps(adapt_with, score, step_weights)


def batched_anil(plan: BatchedPlan, params: Params, episode: Episode, *, inner_lr: LearningRate,
                 inner_steps: int, first_order: bool, loss_fn: LossFn | None = None,
                 step_weights: StepWeights = None) -> tuple[Tensor, Tensor]:
    """Per-task query losses (T,) and accuracies (T,) of ANIL (only the head adapted)."""
    support_x, query_x = episode.support_x, episode.query_x
    tasks = support_x.shape[0]
    if support_x.shape[1:] == query_x.shape[1:]:
        # One body pass over 2T groups (support sets, then query sets), each normalized on its own.
        features = task_batched_body(plan, params, torch.cat([support_x, query_x]))  # (2T, B, D)
        support_f, query_f = features[:tasks], features[tasks:]
    else:
        support_f = task_batched_body(plan, params, support_x)  # (T, N*K, D)
        query_f = task_batched_body(plan, params, query_x)  # (T, N*Q, D)
    head = {k: params[k] for k in HEAD_KEYS}

    def adapt_with(on_step: Callable[[int, Params], None] | None) -> Params:
        return _adapt(lambda p, f: task_batched_head(p, f), head, HEAD_KEYS, support_f, episode.support_y,
                      inner_lr=inner_lr, steps=inner_steps, first_order=first_order, loss_fn=loss_fn,
                      on_step=on_step)

    def score(fast: Params) -> tuple[Tensor, Tensor]:
        logits = task_batched_head(fast, query_f)  # (T, N*Q, N)
        return _task_loss(logits, episode.query_y, loss_fn), _task_acc(logits, episode.query_y)

    return weighted_over_steps(adapt_with, score, step_weights)
