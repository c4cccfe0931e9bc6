"""MAML, first-order MAML and ANIL on a whole meta-batch, for networks built from metagrad's layers.

The vmap path runs each task's computation under ``torch.func.vmap``; this one runs the model's own
forward once on all tasks inside ``models.layers.task_batch(T)``, where metagrad's layers take (T, B, ...)
inputs and shared or per-task parameters (grouped convolutions, a fused per-task BatchNorm, batched
matrix products), differentiated with plain ``torch.autograd``. The numbers are the per-task loop's (the
tests in ``tests/algorithms`` compare all paths against a hand-unrolled reference).

Which models: those whose parameters all belong to metagrad's layers and whose other modules are
task-safe (``layers.task_batch_obstacle``). A forward is arbitrary Python and could still mix tasks
(``x.view(x.size(0), -1)`` between layers folds the task dimension into the batch), so
``batching_mismatch`` runs it once on two tasks, batched and task by task, with distinct per-task
parameters; the caller (``meta_batch.strategy_for``) keeps the verdict per model.

Inner loop: each adapted parameter is expanded to one copy per task (``p.expand(T, ...)``, a view, so
the graph still reaches the meta-parameter ``p``). The support loss summed over tasks depends on copy t
only through task t, so one gradient of that sum gives every task its own gradient: the step is
``functional.gradient_step``, the one every inner loop takes.

ANIL runs the body (``model.features``) once on all tasks' support and query images as 2T tasks (shared
weights; per-task, per-set BatchNorm statistics as in ``anil_task_loss``), then adapts only the head
(``model.classifier``) on those features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad import per_step
from metagrad.algorithms.anil import split_body_head
from metagrad.algorithms.maml import is_classification, weighted_over_steps
from metagrad.functional import forward_with, gradient_step, lr_at
from metagrad.models import HEAD_PREFIX
from metagrad.models.layers import Conv2d, Linear, task_batch
from metagrad.types import Episode, LearningRate, LossFn, Params

if TYPE_CHECKING:
    from metagrad.algorithms.inner_loop import InnerLoop

__all__ = ["CPU_CHUNK_ELEMENTS", "batched_anil", "batched_maml", "batching_mismatch", "tasks_per_chunk"]

CPU_CHUNK_ELEMENTS = 1 << 21
"""On CPU, tasks are batched in chunks whose first-layer activations (support and query) stay under
about this many elements (8 MB in float32): it bounds the memory of the chunk's graph and of BatchNorm's
double backward, and is large enough to keep two threads busy (docs/PERFORMANCE.md, "Memory against speed
on the CPU"; ``benchmarks/chunk_budget.py``). On CUDA the
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


def _forward(module: nn.Module, params: Params, x: Tensor) -> Tensor:
    """``module`` on x (T, B, ...) with shared or per-task ``params``: every task's output, (T, B, ...)."""
    with task_batch(x.shape[0]):
        return forward_with(module, params, {}, x)


def _conv_size(size: int, conv: Conv2d, dim: int) -> int:
    """Output size along spatial ``dim`` (0 or 1) of ``conv`` on ``size`` input pixels."""
    if isinstance(conv.padding, str):  # "same" keeps the size (stride 1), "valid" pads nothing
        return size if conv.padding == "same" else size - conv.dilation[dim] * (conv.kernel_size[dim] - 1)
    span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
    return (size + 2 * conv.padding[dim] - span) // conv.stride[dim] + 1


def tasks_per_chunk(model: nn.Module, episode: Episode) -> int:
    """How many tasks to batch at once: all on GPU, on CPU as many as ``CPU_CHUNK_ELEMENTS`` allows.

    The size of a task is measured by the output of the model's first convolution or linear layer (in
    module order) on its support and query sets; a model with neither is batched whole.
    """
    if episode.support_x.device.type != "cpu":
        return episode.num_tasks
    first = next((m for m in model.modules() if isinstance(m, (Conv2d, Linear))), None)
    if first is None:
        return episode.num_tasks
    if isinstance(first, Conv2d):
        height, width = episode.support_x.shape[-2:]
        per_image = first.out_channels * _conv_size(height, first, 0) * _conv_size(width, first, 1)
    else:
        per_image = first.out_features
    per_task = (episode.support_x.shape[1] + episode.query_x.shape[1]) * max(1, per_image)
    return max(1, min(episode.num_tasks, CPU_CHUNK_ELEMENTS // per_task))


def batched_maml(model: nn.Module, params: Params, episode: Episode,
                 loop: InnerLoop) -> tuple[Tensor, Tensor]:
    """Per-task query losses (T,) and accuracies (T,) of MAML (all parameters adapted) with the settings
    of ``loop`` (``InnerLoop``; its ``algorithm`` is not read)."""
    def adapt_with(on_step: Callable[[int, Params], None] | None) -> Params:
        return _adapt(lambda p, x: _forward(model, p, x), params, list(params),
                      episode.support_x, episode.support_y, inner_lr=loop.inner_lr, steps=loop.inner_steps,
                      first_order=loop.first_order, loss_fn=loop.loss_fn, on_step=on_step)

    def score(fast: Params) -> tuple[Tensor, Tensor]:
        logits = _forward(model, fast, episode.query_x)  # (T, N*Q, N)
        return _task_loss(logits, episode.query_y, loop.loss_fn), _task_acc(logits, episode.query_y)

    return weighted_over_steps(adapt_with, score, loop.step_weights)


def _head_of(params: Params) -> Params:
    """Head parameters under the head's own names (``classifier.weight`` -> ``weight``)."""
    return {k[len(HEAD_PREFIX):]: v for k, v in params.items() if k.startswith(HEAD_PREFIX)}


def batched_anil(model: nn.Module, params: Params, episode: Episode,
                 loop: InnerLoop) -> tuple[Tensor, Tensor]:
    """Per-task query losses (T,) and accuracies (T,) of ANIL (only the head adapted), as for
    ``batched_maml``."""
    body, _ = split_body_head(model, params)
    support_x, query_x = episode.support_x, episode.query_x
    tasks = support_x.shape[0]
    if support_x.shape[1:] == query_x.shape[1:]:
        # One body pass over 2T tasks (support sets, then query sets), each normalized on its own.
        features = _forward(model.features, body, torch.cat([support_x, query_x]))  # (2T, B, D)
        support_f, query_f = features[:tasks], features[tasks:]
    else:
        support_f = _forward(model.features, body, support_x)  # (T, N*K, D)
        query_f = _forward(model.features, body, query_x)  # (T, N*Q, D)
    # The head keeps the model's names, as the learning rates (Meta-SGD's, LSLR's) are keyed.
    head = {k: v for k, v in params.items() if k.startswith(HEAD_PREFIX)}

    def adapt_with(on_step: Callable[[int, Params], None] | None) -> Params:
        return _adapt(lambda p, f: _forward(model.classifier, _head_of(p), f), head, list(head), support_f,
                      episode.support_y, inner_lr=loop.inner_lr, steps=loop.inner_steps,
                      first_order=loop.first_order, loss_fn=loop.loss_fn, on_step=on_step)

    def score(fast: Params) -> tuple[Tensor, Tensor]:
        logits = _forward(model.classifier, _head_of(fast), query_f)  # (T, N*Q, N)
        return _task_loss(logits, episode.query_y, loop.loss_fn), _task_acc(logits, episode.query_y)

    return weighted_over_steps(adapt_with, score, loop.step_weights)


def _distinct_per_task(params: Params, tasks: int) -> Params:
    """A different copy of every parameter for each task, (T, ...), near the given values."""
    generator = torch.Generator().manual_seed(0)
    copies = {}
    for k, v in params.items():
        noise = torch.randn(tasks, *v.shape, generator=generator, dtype=torch.float64).to(v)
        copies[k] = v * (1 + 0.1 * noise) + 0.01 * noise.flip(0)
    return copies


def _mismatch(module: nn.Module, params: Params, x: Tensor) -> str | None:
    """Why ``module`` on tasks x (T, B, ...) gives something else batched than task by task, with the
    parameters shared and with distinct per-task copies; None if it agrees."""
    tasks = x.shape[0]
    for which, tensors in (("shared", params), ("per-task", _distinct_per_task(params, tasks))):
        own = [tensors if which == "shared" else {k: v[t] for k, v in tensors.items()} for t in range(tasks)]
        expected = torch.stack([forward_with(module, own[t], {}, x[t]) for t in range(tasks)])  # (T, B, ...)
        try:
            got = _forward(module, tensors, x)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            return f"its forward fails on a meta-batch ({type(err).__name__}: {str(err).splitlines()[0]})"
        if got.shape != expected.shape:
            return (f"its forward on a meta-batch returns {tuple(got.shape)}, task by task "
                    f"{tuple(expected.shape)}: it does not keep the task dimension")
        scale = expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item() or 1.0
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
            return (f"its forward on a meta-batch differs from each task run alone ({which} parameters): "
                    "it mixes tasks, e.g. x.view(x.size(0), -1) between layers")
    return None


def batching_mismatch(model: nn.Module, params: Params, episode: Episode, *, anil: bool) -> str | None:
    """Why ``model`` computes something else on the batched strategy than task by task, or None if not.

    Runs the model (for ANIL its ``features``, then its ``classifier`` on their output, as ANIL calls
    them) on the support sets of two tasks of ``episode``, inside ``task_batch(2)`` and task by task,
    once with ``params`` shared and once with distinct per-task copies. Cheap: forwards of two tasks,
    without gradients, with dropout off (eval mode) meanwhile; the model is left as it was.

    Raises:
        ConfigError: ANIL on a model without ``features`` and ``classifier`` (as on every path).
    """
    x = episode.support_x[:2]  # (2, B, ...): two tasks (the one task twice if there is only one)
    # finite values, so that a diverged run or NaN images still give a verdict on the shapes alone
    x = (torch.cat([x, x]) if x.shape[0] == 1 else x).nan_to_num(0.0, 0.0, 0.0)
    params = {k: v.detach().nan_to_num(0.0, 0.0, 0.0) for k, v in params.items()}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if not anil:
                return _mismatch(model, params, x)
            body, head = split_body_head(model, params)
            why = _mismatch(model.features, body, x)
            if why is not None:
                return why
            features = torch.stack([forward_with(model.features, body, {}, task) for task in x])  # (2, B, D)
            return _mismatch(model.classifier, head, features)
    finally:
        for m, training in modes.items():
            m.training = training
