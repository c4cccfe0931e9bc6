"""The engine: an algorithm on a meta-batch of tasks, as one computation, on any strategy.

``meta_batch_loss`` (the meta-training loss), ``evaluate`` (accuracies, no graph kept),
``chunk_gradients`` (the meta-gradient, chunk of tasks by chunk) and ``meta_train_step`` (one outer
step) take the algorithm as one value (``algorithms.base.Algorithm``: MAML, ANIL, ...) and run its
``objective`` on the strategy ``vectorize`` selects (``algorithms/strategies.py``): a strategy supplies
only the forward over a meta-batch; the inner loop, the losses and the meta-gradient are the same code
on all three, so every algorithm and option runs on every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import Algorithm, Tasks
from metagrad.algorithms.strategies import (
    STRATEGIES,
    Vmapped,
    batched,
    frozen,
    looped,
    strategy_for,
    tasks_per_chunk,
)
from metagrad.errors import ConfigError, TrainingError
from metagrad.functional import IGNORE_INDEX, learned_rates
from metagrad.models.layers import task_batch_obstacle
from metagrad.types import Buffers, Episode, LearningRate, Params

__all__ = ["MetaBatchOutput", "check_episode", "chunk_gradients", "evaluate", "evaluate_with_losses",
           "meta_batch_loss", "meta_rates", "meta_train_step", "set_gradients", "task_objectives"]


@dataclass(frozen=True)
class MetaBatchOutput:
    """The result of ``meta_batch_loss`` on a meta-batch of T tasks.

    Attributes:
        loss: scalar mean of the algorithm's objective over the tasks (MAML: the query loss after
            adaptation), differentiable w.r.t. the params it was given: its gradient is the meta-gradient.
        task_losses: (T,) detached query loss of each task.
        task_accs: (T,) detached query accuracy of each task; None where the targets are not class labels.
    """

    loss: Tensor
    task_losses: Tensor
    task_accs: Tensor | None


def check_episode(episode: Episode) -> None:
    """Raise ValueError unless ``episode`` has the documented shapes, a task, support and query samples
    in every task, and in each task some support and some query label that is not ignored (-100)."""
    sx, sy, qx, qy = episode.support_x, episode.support_y, episode.query_x, episode.query_y
    if (min(t.dim() for t in (sx, sy, qx, qy)) < 2 or sx.shape[:2] != sy.shape[:2]
            or qx.shape[:2] != qy.shape[:2]):
        raise ValueError(
            "episode must hold support_x (T, N*K, ...), support_y (T, N*K, ...), query_x (T, N*Q, ...), "
            f"query_y (T, N*Q, ...); got {tuple(sx.shape)}, {tuple(sy.shape)}, {tuple(qx.shape)}, "
            f"{tuple(qy.shape)}")
    if episode.num_tasks == 0 or qx.shape[0] != sx.shape[0]:
        raise ValueError(f"episode needs the same positive number of tasks in support and query, got "
                         f"{sx.shape[0]} and {qx.shape[0]}")
    for name, x, y in (("support", sx, sy), ("query", qx, qy)):
        if x.shape[1] == 0:
            raise ValueError(f"the {name} sets are empty; every task needs {name} samples")
        if not y.is_floating_point() and y.dim() == 2 and bool((y == IGNORE_INDEX).all(dim=1).any()):
            task = int((y == IGNORE_INDEX).all(dim=1).nonzero()[0])
            raise ValueError(f"every {name} label of task {task} is the ignore index {IGNORE_INDEX}, so its "
                             f"{name} loss is undefined; give each task some labelled {name} samples")


def _no_second_derivative(err: RuntimeError, model: nn.Module) -> ConfigError | None:
    """The message for an operation torch cannot differentiate twice (e.g. CPU flash attention), else None."""
    text = str(err)
    if "derivative for" not in text or "not implemented" not in text:
        return None
    return ConfigError(
        f"{type(model).__name__} uses an operation that torch cannot differentiate twice "
        f"({text.splitlines()[0]}), which second-order MAML needs. Train it first order (first_order=True; "
        "CLI: --algorithm fomaml), or replace that operation (e.g. attention written out instead of "
        "scaled_dot_product_attention's fused kernel).")


def task_objectives(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers,
                    episode: Episode, *, strategy: str, frozen_names: frozenset[str] = frozenset()
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``algorithm.objective`` on every task of ``episode`` with the forward of ``strategy``:
    ``(objective, query_losses, query_accs)``, each (T,) and still attached to the graph."""
    check_episode(episode)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    buffers = {**dict(model.named_buffers()), **buffers}
    if strategy == "vmap":
        run = Vmapped(buffers)
        try:
            out = algorithm.objective(Tasks(model, params, buffers, episode, run, frozen_names))
        except RuntimeError as err:
            if (explained := _no_second_derivative(err, model)) is not None:
                raise explained from err
            raise
        run.replay(episode.num_tasks)
        return out
    chunk = 1  # the loop: one task at a time
    if strategy == "batched":
        reason = task_batch_obstacle(model)
        if reason is not None:
            raise ValueError(f"the batched strategy does not support {type(model).__name__}: {reason}")
        chunk = tasks_per_chunk(model, episode)
    forward = batched if strategy == "batched" else looped
    parts = [algorithm.objective(Tasks(model, params, buffers, episode.slice(start, start + chunk), forward,
                                       frozen_names)) for start in range(0, episode.num_tasks, chunk)]
    return tuple(torch.cat(part) for part in zip(*parts))  # type: ignore[return-value]


def _accuracies(accs: Tensor, episode: Episode) -> Tensor | None:
    # Float targets (regression) have no accuracy; decided from the dtype, without a device sync.
    return None if episode.query_y.is_floating_point() else accs.detach()


def meta_batch_loss(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers,
                    episode: Episode, *, vectorize: bool = True) -> MetaBatchOutput:
    """The meta-training loss of a meta-batch: the mean of the algorithm's objective over its tasks.

    Args:
        algorithm: what adapts and how (``MAML(inner_lr=0.4, inner_steps=1)``, ``ANIL(...)``, or
            ``algorithms.make(name, ...)``). Learned rates in its ``inner_lr`` that require grad receive
            their meta-gradient from ``out.loss.backward()``.
        model: supplies the computation; pass its tensors as ``params``/``buffers``.
        params: name -> tensor, usually ``dict(model.named_parameters())`` so that
            ``out.loss.backward()`` fills the parameters' ``.grad`` with the meta-gradient. Frozen
            parameters (``requires_grad=False`` beside others) are neither adapted nor given a gradient.
        buffers: name -> tensor, usually ``dict(model.named_buffers())`` (empty for the standard models).
        episode: T tasks: support_x (T, N*K, C, H, W), support_y (T, N*K), query_x (T, N*Q, C, H, W),
            query_y (T, N*Q); float targets (T, K, ...) with a regression ``loss_fn``.
        vectorize: True for the fastest vectorized strategy available for ``model`` (``strategy_for``),
            False for the per-task loop (the reference). All give the same numbers.

    Returns:
        ``MetaBatchOutput(loss, task_losses, task_accs)``.

    Raises:
        ValueError: an episode whose tensors do not have the documented shapes, empty sets, all labels
            of a set ignored, or a ``loss_fn`` that does not return a scalar.

    Example:
        >>> out = meta_batch_loss(MAML(inner_lr=0.4, inner_steps=1), model, dict(model.named_parameters()),
        ...                       {}, episode)
        >>> out.loss.backward()
    """
    strategy = strategy_for(algorithm, model, params, buffers, vectorize=vectorize, episode=episode)
    objective, losses, accs = task_objectives(algorithm, model, params, buffers, episode, strategy=strategy,
                                              frozen_names=frozen(params))
    return MetaBatchOutput(objective.mean(), losses.detach(), _accuracies(accs, episode))


def evaluate_with_losses(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers,
                         episode: Episode, *, vectorize: bool = True) -> tuple[Tensor, Tensor]:
    """Query losses and accuracies of each task after adaptation, detached, keeping no meta-gradient graph.

    The inner loop runs as ``algorithm`` says (pass test-time settings with ``algorithm.replace``: the
    MAML paper adapts 10 steps at test), first order and with learned rates detached
    (``Algorithm.detached``): the same values, nothing kept for an outer backward.

    Returns:
        ``(losses (T,), accuracies (T,))``.
    """
    strategy = strategy_for(algorithm, model, params, buffers, vectorize=vectorize, episode=episode)
    frozen_names = frozen(params)
    params = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in buffers.items()}  # views: running statistics still update
    with torch.no_grad():  # the inner loop re-enables what it needs (functional.inner_loop)
        _, losses, accs = task_objectives(algorithm.detached(), model, params, buffers, episode,
                                          strategy=strategy, frozen_names=frozen_names)
    return losses.detach(), accs.detach()


def evaluate(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers, episode: Episode, *,
             vectorize: bool = True) -> Tensor:
    """(T,) detached query accuracies after adaptation: ``evaluate_with_losses``'s second half."""
    return evaluate_with_losses(algorithm, model, params, buffers, episode, vectorize=vectorize)[1]


def chunk_gradients(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers,
                    episode: Episode, *, vectorize: bool = True, max_tasks_per_chunk: int | None = None
                    ) -> tuple[MetaBatchOutput, Tensor]:
    """The meta-gradient of a meta-batch, computed chunk of tasks by chunk, each back-propagated at once.

    Only one chunk's graph is alive at a time (as learn2learn back-propagates task by task), so the
    peak memory is a chunk's, not the whole meta-batch's. The chunk is ``strategies.tasks_per_chunk``
    for the batched strategy (cache-sized on CPU, the whole meta-batch on CUDA), the whole meta-batch
    otherwise; ``max_tasks_per_chunk`` caps it, for any strategy (1: learn2learn's peak memory).

    The chunks' gradients are added in float64, exact for a few float32 terms of similar magnitude: the
    sum does not depend on the order of the additions, so processes that each sum a share of the chunks
    and then all-reduce (in float64) get the same bits as one process.

    Returns:
        ``(out, grad)``: the detached ``MetaBatchOutput`` and the gradient of the SUM of the tasks'
        objectives, flat (P + R,) float64 in the order of ``{**params, **meta_rates(algorithm.inner_lr)}``
        (learned rates are meta-parameters too). Divide by the number of tasks for the mean's.
    """
    strategy = strategy_for(algorithm, model, params, buffers, vectorize=vectorize, episode=episode)
    chunk = tasks_per_chunk(model, episode) if strategy == "batched" else episode.num_tasks
    if max_tasks_per_chunk is not None:
        if max_tasks_per_chunk < 1:
            raise ValueError(f"max_tasks_per_chunk must be at least 1 (or None), got {max_tasks_per_chunk}")
        chunk = min(chunk, max_tasks_per_chunk)
    wrt = {**params, **meta_rates(algorithm.inner_lr)}  # the model's parameters, then the learned rates
    trainable = [n for n in wrt if wrt[n].requires_grad]
    frozen_names = frozen(params)
    losses, accs = [], []
    total = torch.zeros(sum(p.numel() for p in wrt.values()), dtype=torch.float64,
                        device=next(iter(params.values())).device)
    for start in range(0, episode.num_tasks, chunk):
        try:
            objective, loss, acc = task_objectives(algorithm, model, params, buffers,
                                                   episode.slice(start, start + chunk), strategy=strategy,
                                                   frozen_names=frozen_names)
            grads = dict(zip(trainable, torch.autograd.grad(objective.sum(), [wrt[n] for n in trainable],
                                                            allow_unused=True)))
        except RuntimeError as err:  # in the outer backward: where a missing second derivative shows
            if (explained := _no_second_derivative(err, model)) is not None:
                raise explained from err
            raise
        total += torch.cat([  # zeros for frozen parameters and for those the objective does not use
            (g if (g := grads.get(n)) is not None else torch.zeros_like(p)).reshape(-1)
            for n, p in wrt.items()
        ]).double()
        losses.append(loss.detach())
        accs.append(acc.detach())
    task_losses = torch.cat(losses)
    return MetaBatchOutput(task_losses.mean(), task_losses, _accuracies(torch.cat(accs), episode)), total


def meta_train_step(algorithm: Algorithm, model: nn.Module, optimizer: torch.optim.Optimizer,
                    episode: Episode, *, vectorize: bool = True, max_tasks_per_chunk: int | None = None,
                    params: Params | None = None) -> MetaBatchOutput:
    """One outer step: the meta-gradient of the meta-batch (``chunk_gradients``), then ``optimizer.step()``.

    Args:
        algorithm, episode, vectorize, max_tasks_per_chunk: as for ``chunk_gradients``.
        model: the meta-learned model; its parameters are updated in place by the optimizer.
        optimizer: over the model's parameters and the learned rates of ``algorithm.inner_lr`` (Adam in
            the MAML paper; plain SGD for Reptile, whose meta-gradient is the parameter difference).
        params: the meta-parameters, if not ``dict(model.named_parameters())``: e.g. with MAML++'s
            per-step BatchNorm copies (``metagrad.per_step.per_step_bn_params``); the optimizer holds them.

    Returns:
        The step's ``MetaBatchOutput`` (computed before the update; its loss detached).

    Raises:
        TrainingError: the loss is NaN or infinite (the parameters are left unchanged).
    """
    optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters()) if params is None else params
    out, grads = chunk_gradients(algorithm, model, params, dict(model.named_buffers()), episode,
                                 vectorize=vectorize, max_tasks_per_chunk=max_tasks_per_chunk)
    if not torch.isfinite(out.loss):
        raise TrainingError(f"meta-training loss is {out.loss.item()}; lower meta_lr or inner_lr")
    set_gradients({**params, **meta_rates(algorithm.inner_lr)}, grads / episode.num_tasks)
    optimizer.step()
    return out


def meta_rates(inner_lr: LearningRate) -> Params:
    """The learned rates of ``inner_lr`` as meta-parameters, named ``"inner_lr.<where>"``
    (``functional.learned_rates``) so that they never clash with the model's parameter names."""
    return {f"inner_lr.{k}": v for k, v in learned_rates(inner_lr).items()}


def set_gradients(params: Params, flat: Tensor) -> None:
    """Set each parameter's ``.grad`` from a flat (P,) vector in ``params`` order (cast to its dtype).

    Frozen parameters (``requires_grad=False``) get none, so that no optimizer moves them.
    """
    for p, g in zip(params.values(), flat.split([p.numel() for p in params.values()])):
        if p.requires_grad:
            p.grad = g.view_as(p).to(p.dtype, copy=True)
