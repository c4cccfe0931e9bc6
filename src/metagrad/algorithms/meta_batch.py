"""A meta-batch of tasks as one computation: the meta-training loss, evaluation and the outer step.

``meta_batch_loss`` evaluates an algorithm's per-task loss on every task of an ``Episode`` by one of
three strategies (``STRATEGIES``); the ``vectorize`` flag picks between them:

* ``"batched"`` (``vectorize=True`` on a network built from metagrad's layers, ``models.layers``): the
  model's own forward runs once on all tasks inside ``models.layers.task_batch``, where the layers fold
  the task dimension in (grouped convolutions, per-task fused BatchNorm, batched matrix products), and
  is differentiated with plain autograd; see ``algorithms/batched.py``. A forward that mixes tasks is
  caught by a check on the first meta-batch and takes vmap. On CPU the tasks go in cache-sized chunks
  (``algorithms.batched.tasks_per_chunk``).
* ``"vmap"`` (``vectorize=True`` on any other model): ``torch.func.vmap`` over the task dimension, the
  inner gradients taken with ``torch.func.grad``, under ``metagrad.vmap_exact.ExactFunctions``: torch's
  fused normalizations (whose double backward is wrong under vmap) are computed from their definition,
  and BatchNorm running statistics are updated afterwards in the loop's order. A model that vmap
  cannot run exactly (``vmap_exact.loop_reason``) takes the loop; the choice is logged once per model.
* ``"loop"`` (``vectorize=False``): a plain Python loop over tasks with ``torch.autograd.grad``, kept as
  the reference the tests compare the other paths against.

All three give the same numbers (up to rounding); the exactness tests in ``tests/algorithms`` run on each.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metagrad import per_step, vmap_exact
from metagrad.algorithms.anil import anil_task_loss
from metagrad.algorithms.batched import batched_anil, batched_maml, batching_mismatch, tasks_per_chunk
from metagrad.algorithms.inner_loop import ALGORITHMS, Algorithm, InnerLoop
from metagrad.algorithms.maml import maml_task_loss
from metagrad.errors import ConfigError, TrainingError
from metagrad.functional import learned_rates
from metagrad.models.layers import task_batch_obstacle
from metagrad.types import Buffers, Episode, LearningRate, LossFn, Params, StepWeights

__all__ = [
    "ALGORITHMS",
    "STRATEGIES",
    "Algorithm",
    "InnerLoop",
    "MetaBatchOutput",
    "chunk_gradients",
    "evaluate",
    "evaluate_with_losses",
    "meta_batch_loss",
    "meta_rates",
    "meta_train_step",
    "set_gradients",
    "strategy_for",
    "task_losses",
]

logger = logging.getLogger(__name__)

VMAP_RANDOMNESS = "different"
"""vmap's randomness mode: each task draws its own random numbers, as independent tasks would (e.g.
different dropout masks). The loop draws them task after task from torch's generator, so a model with
dropout in train mode gets other masks on the two paths: they agree in distribution, and each computes
the exact meta-gradient of the masks it drew."""


STRATEGIES = ("batched", "vmap", "loop")
"""How a meta-batch is computed, fastest first (see the module docstring)."""

_BATCHED = {maml_task_loss: batched_maml, anil_task_loss: batched_anil}


@dataclass(frozen=True)
class MetaBatchOutput:
    """The result of ``meta_batch_loss`` on a meta-batch of T tasks.

    Attributes:
        loss: scalar mean query loss over the tasks, differentiable w.r.t. the params it was given.
        task_losses: (T,) detached query loss of each task.
        task_accs: (T,) detached query accuracy of each task; None where the targets are not class
            labels (a regression loss).
    """

    loss: Tensor
    task_losses: Tensor
    task_accs: Tensor | None


def _check_shapes(episode: Episode) -> None:
    sx, sy, qx, qy = episode.support_x, episode.support_y, episode.query_x, episode.query_y
    if (min(t.dim() for t in (sx, sy, qx, qy)) < 2 or sx.shape[:2] != sy.shape[:2]
            or qx.shape[:2] != qy.shape[:2]):
        raise ValueError(
            "episode must hold support_x (T, N*K, ...), support_y (T, N*K, ...), query_x (T, N*Q, ...), "
            f"query_y (T, N*Q, ...); got {tuple(sx.shape)}, {tuple(sy.shape)}, {tuple(qx.shape)}, "
            f"{tuple(qy.shape)}"
        )
    if episode.num_tasks == 0 or qx.shape[0] != sx.shape[0]:
        raise ValueError(f"episode needs the same positive number of tasks in support and query, got "
                         f"{sx.shape[0]} and {qx.shape[0]}")


_VMAP_ERRORS = ("vmap", "captured Tensor", "functorch", "Batching rule", "in-place operation")


def _no_second_derivative(err: RuntimeError, model: nn.Module) -> ConfigError | None:
    """The message for an operation torch cannot differentiate twice (e.g. CPU flash attention), else None."""
    text = str(err)
    if "derivative for" not in text or "not implemented" not in text:
        return None
    return ConfigError(
        f"{type(model).__name__} uses an operation that torch cannot differentiate twice "
        f"({text.splitlines()[0]}), which second-order MAML needs. Train it first order (first_order=True; "
        "CLI: --algorithm fomaml), or replace that operation (e.g. attention written out instead of "
        "scaled_dot_product_attention's fused kernel)."
    )


def _vectorized(task_loss: Callable[..., tuple[Tensor, Tensor]], model: nn.Module, buffers: Buffers,
                episode: Episode) -> tuple[Tensor, Tensor]:
    modes: list[vmap_exact.ExactFunctions] = []
    # Buffers not passed run as the module's own (functional_call); their running statistics update
    # there, as on the loop, so the mode must know them too.
    buffers = {**dict(model.named_buffers()), **buffers}

    def exact_task(*task: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        with vmap_exact.exact_functions(buffers) as mode:
            loss, acc = task_loss(*task)
        modes.append(mode)
        return loss, acc, mode.task_stats()

    # Parameters and buffers are closed over, so vmap treats them as shared by all tasks (unbatched).
    try:
        losses, accs, stats = torch.func.vmap(exact_task, randomness=VMAP_RANDOMNESS)(
            episode.support_x, episode.support_y, episode.query_x, episode.query_y
        )
    except RuntimeError as err:
        if (explained := _no_second_derivative(err, model)) is not None:
            raise explained from err
        if not any(s in str(err) for s in _VMAP_ERRORS):
            raise
        raise ConfigError(
            f"{type(model).__name__} cannot run vectorized over tasks: {str(err).splitlines()[0]} Pass "
            "vectorize=False (CLI: --no-vectorize) to run one task at a time, which is exact."
        ) from err
    vmap_exact.replay_running_stats(buffers, modes[0], stats, episode.num_tasks)
    return losses, accs


def _looped(task_loss: Callable[..., tuple[Tensor, Tensor]], episode: Episode) -> tuple[Tensor, Tensor]:
    losses, accs = zip(*(task_loss(*episode.task(i)) for i in range(episode.num_tasks)))
    return torch.stack(losses), torch.stack(accs)


_LOGGED: set[tuple[type, str, str]] = set()


def _log_once(model: nn.Module, strategy: str, why: str) -> None:
    key = (type(model), strategy, why)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s runs on the %s strategy: %s", type(model).__name__, strategy, why)


def _frozen(params: Params) -> frozenset[str]:
    """Names of frozen parameters (``requires_grad=False`` beside others that require it).

    The inner loop leaves them as they are, as learn2learn's ``adapt`` does by default; when no
    parameter requires grad (detached copies, as in evaluation) every one is adapted.
    """
    if not any(p.requires_grad for p in params.values()):
        return frozenset()
    return frozenset(k for k, p in params.items() if not p.requires_grad)


def _accuracies(accs: Tensor, episode: Episode) -> Tensor | None:
    # Float targets (regression) have no accuracy; decided from the dtype, without a device sync.
    return None if episode.query_y.is_floating_point() else accs.detach()


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[bool, str | None]] = weakref.WeakKeyDictionary()
"""model -> {anil: why its forward cannot run batched, or None}: the check of its first meta-batch."""


def _batched_obstacle(algorithm: str, model: nn.Module, params: Params, buffers: Buffers,
                      episode: Episode | None) -> str | None:
    """Why the batched strategy cannot run ``algorithm`` on ``model`` with these tensors, or None."""
    spec = ALGORITHMS.get(algorithm)
    if spec is None or spec.task_loss not in _BATCHED:
        return f"the batched strategy does not implement {algorithm!r}"
    reason = task_batch_obstacle(model)
    if reason is not None:
        return f"not built from metagrad's layers: {reason}"
    names = dict(model.named_parameters())
    if buffers or params.keys() != names.keys() or any(params[k].shape != v.shape for k, v in names.items()):
        return "the parameters or buffers passed are not the model's own"
    if _frozen(params):
        return "some parameters are frozen"
    anil = spec.task_loss is anil_task_loss
    verdicts = _VERIFIED.setdefault(model, {})
    if anil not in verdicts and episode is not None:
        _check_shapes(episode)
        verdicts[anil] = batching_mismatch(model, params, episode, anil=anil)
    return verdicts.get(anil)


def strategy_for(algorithm: str, model: nn.Module, params: Params, buffers: Buffers, *,
                 vectorize: bool = True, episode: Episode | None = None) -> str:
    """The strategy ``vectorize`` selects for this model.

    "batched" where the model is built from metagrad's layers (``models.layers.task_batch_obstacle``),
    ``params`` holds exactly its parameters (none frozen, no buffers) and its forward does not mix
    tasks: the first call with an ``episode`` checks that on two of its tasks
    (``batched.batching_mismatch``) and the verdict is kept for the model; without an episode, a model
    not checked yet gets the verdict of its structure. "vmap" for other models that vmap runs exactly,
    and "loop" when ``vectorize`` is False or vmap cannot be exact (``vmap_exact.loop_reason``). The
    choice is logged once per model class and reason.

    Raises:
        ValueError: ``episode`` does not have the documented shapes.
    """
    if not vectorize:
        return "loop"
    params = per_step.at_step(params, 0)  # BNWB's per-step copies under the model's names
    why_not = _batched_obstacle(algorithm, model, params, buffers, episode)
    if why_not is None:
        return "batched"
    reason = vmap_exact.loop_reason(model)
    if reason is not None:
        _log_once(model, "loop", f"{reason}; one task at a time is exact but slower")
        return "loop"
    _log_once(model, "vmap", f"{why_not}; torch.func.vmap over tasks")
    return "vmap"


def task_losses(
    algorithm: str,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    episode: Episode,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    first_order: bool | None = None,
    vectorize: bool = True,
    loss_fn: LossFn | None = None,
    step_weights: StepWeights = None,
) -> tuple[Tensor, Tensor]:
    """Per-task query losses (T,) and accuracies (T,) of ``algorithm``, both still attached to the graph.

    Arguments as for ``meta_batch_loss``.
    """
    loop = InnerLoop(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, first_order=bool(first_order),
                     loss_fn=loss_fn, step_weights=step_weights)
    return _chosen_losses(loop, model, params, buffers, episode, vectorize=vectorize)


def _chosen_losses(loop: InnerLoop, model: nn.Module, params: Params, buffers: Buffers, episode: Episode, *,
                   vectorize: bool) -> tuple[Tensor, Tensor]:
    # _task_losses on the strategy that vectorize selects for the model
    strategy = strategy_for(loop.algorithm, model, params, buffers, vectorize=vectorize, episode=episode)
    return _task_losses(loop, model, params, buffers, episode, strategy=strategy, frozen=_frozen(params))


def _task_losses(
    loop: InnerLoop,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    episode: Episode,
    *,
    strategy: str,
    frozen: frozenset[str] = frozenset(),
) -> tuple[Tensor, Tensor]:
    # task_losses with an explicit strategy (the tests run every strategy through here).
    _check_shapes(episode)
    task_loss = loop.spec.task_loss
    if task_loss is not maml_task_loss and per_step.per_step_copies(params):
        raise ConfigError(f"per-step BatchNorm weights (MAML++'s BNWB) need an algorithm that adapts the "
                          f"whole network (maml, fomaml); {loop.algorithm} runs the body once: set "
                          "meta.per_step_bn = false")
    logger.debug("%s on %d tasks: inner_steps=%d first_order=%s strategy=%s",
                 loop.algorithm, episode.num_tasks, loop.inner_steps, loop.first_order, strategy)
    if strategy == "batched":
        reason = task_batch_obstacle(model)
        if reason is not None:
            raise ValueError(f"the batched strategy does not support {type(model).__name__}: {reason}")
        chunk = tasks_per_chunk(model, episode)
        losses, accs = zip(*(
            _BATCHED[task_loss](model, params, episode.slice(i, i + chunk), loop)
            for i in range(0, episode.num_tasks, chunk)
        ))
        return torch.cat(losses), torch.cat(accs)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    under_vmap = strategy == "vmap"
    keys = [k for k in params if k not in frozen] if frozen else None

    def one_task(
        support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        return task_loss(model, params, buffers, support_x, support_y, query_x, query_y, loop, keys=keys,
                         under_vmap=under_vmap)

    if under_vmap:
        return _vectorized(one_task, model, buffers, episode)
    return _looped(one_task, episode)


def meta_batch_loss(
    algorithm: str,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    episode: Episode,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    first_order: bool | None = None,
    vectorize: bool = True,
    loss_fn: LossFn | None = None,
    step_weights: StepWeights = None,
) -> MetaBatchOutput:
    """The meta-training loss of a meta-batch: mean query loss after adapting to each task.

    ``inner_lr``, ``inner_steps``, ``first_order``, ``loss_fn`` and ``step_weights`` are checked and
    gathered in one ``InnerLoop``, which the per-task losses take.

    Args:
        algorithm: a name in ``ALGORITHMS`` ("maml", "fomaml", "anil").
        model: supplies the computation; pass its tensors as ``params``/``buffers``.
        params: name -> tensor, usually ``dict(model.named_parameters())`` so that
            ``out.loss.backward()`` fills the parameters' ``.grad`` with the meta-gradient.
        buffers: name -> tensor, usually ``dict(model.named_buffers())`` (empty for the standard models).
        episode: T tasks: support_x (T, N*K, C, H, W), support_y (T, N*K), query_x (T, N*Q, C, H, W),
            query_y (T, N*Q).
        inner_lr: inner learning rate alpha: a number, one per parameter name (e.g. Meta-SGD's learned
            tensors), or a sequence of either with one per inner step (``functional.lr_at``). Learned
            rates that require grad receive their meta-gradient from ``out.loss.backward()``.
        inner_steps: inner gradient steps per task.
        first_order: True makes "maml" and "anil" first order (inner gradients detached); None or
            False keeps their second-order meta-gradient. "fomaml" is first order whatever this says.
        vectorize: True for the fastest vectorized strategy available for ``model`` ("batched" on a
            network built from metagrad's layers, else "vmap"; see ``strategy_for``), False for the
            per-task loop (the reference path). All give the same numbers.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for one task, used in the inner loop and on the
            query set; None for mean cross-entropy on class labels. E.g. ``F.mse_loss`` for regression
            (the episode's targets are then float tensors (T, K, ...) and ``task_accs`` is None).
        step_weights: MAML++'s multi-step loss (MSL): one weight per inner step; each task's loss is then
            the weighted sum of its query losses after every step (``maml.weighted_over_steps``), its
            accuracy the last step's. None (MAML): the last step's query loss.

    Returns:
        ``MetaBatchOutput(loss, task_losses, task_accs)``.

    Raises:
        ConfigError: unknown algorithm, negative ``inner_steps`` or ``inner_lr``, ``step_weights`` not
            one per inner step.
        ValueError: an episode whose tensors do not have the documented shapes.

    Example:
        >>> out = meta_batch_loss("maml", model, dict(model.named_parameters()), {}, episode,
        ...                       inner_lr=0.4, inner_steps=1)
        >>> out.loss.backward()
    """
    loop = InnerLoop(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, first_order=bool(first_order),
                     loss_fn=loss_fn, step_weights=step_weights)
    losses, accs = _chosen_losses(loop, model, params, buffers, episode, vectorize=vectorize)
    return MetaBatchOutput(losses.mean(), losses.detach(), _accuracies(accs, episode))


def evaluate(
    algorithm: str,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    episode: Episode,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    vectorize: bool = True,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Query accuracy of each task after adaptation, keeping no meta-gradient graph.

    The inner loop runs as in training (test-time ``inner_lr``/``inner_steps`` may differ: the MAML
    paper adapts 10 steps at test). First- and second-order adaptation compute the same values, so
    the cheaper first-order inner loop is used and nothing is kept for an outer backward
    (``InnerLoop.detached``).

    Args:
        algorithm, model, params, buffers, episode, inner_lr, inner_steps, vectorize, loss_fn: as for
            ``meta_batch_loss``.

    Returns:
        (T,) detached query accuracies.
    """
    loop = InnerLoop(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn)
    return _evaluated(loop, model, params, buffers, episode, vectorize=vectorize)[1]


def evaluate_with_losses(
    algorithm: str,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    episode: Episode,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    vectorize: bool = True,
    loss_fn: LossFn | None = None,
) -> tuple[Tensor, Tensor]:
    """``evaluate``, also returning the query losses: detached ``(losses (T,), accuracies (T,))``."""
    loop = InnerLoop(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn)
    return _evaluated(loop, model, params, buffers, episode, vectorize=vectorize)


def _evaluated(loop: InnerLoop, model: nn.Module, params: Params, buffers: Buffers, episode: Episode, *,
               vectorize: bool) -> tuple[Tensor, Tensor]:
    # evaluate_with_losses once its settings are checked
    strategy = strategy_for(loop.algorithm, model, params, buffers, vectorize=vectorize, episode=episode)
    frozen = _frozen(params)
    params = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in buffers.items()}  # views: running statistics still update
    with torch.no_grad():  # the inner loop re-enables what it needs (functional.inner_step)
        losses, accs = _task_losses(loop.detached(), model, params, buffers, episode, strategy=strategy,
                                    frozen=frozen)
    return losses.detach(), accs.detach()


def meta_train_step(
    algorithm: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    episode: Episode,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    first_order: bool | None = None,
    vectorize: bool = True,
    max_tasks_per_chunk: int | None = None,
    loss_fn: LossFn | None = None,
    step_weights: StepWeights = None,
    params: Params | None = None,
) -> MetaBatchOutput:
    """One outer step: meta-gradient of the mean query loss over the meta-batch, then ``optimizer.step()``.

    The loss is the mean over tasks, so the gradient is the average of the tasks' query-loss gradients.
    With the batched strategy on CPU each chunk of tasks is back-propagated as soon as its loss exists,
    so only one chunk's graph is held at a time (the peak memory of the whole meta-batch's graph at once
    is what ``meta_batch_loss`` + ``backward`` costs).
    The optimizer (Adam with rate beta in the MAML paper) must hold ``model.parameters()``, and the
    learned rates of ``inner_lr`` (``functional.learned_rates``: Meta-SGD's, LSLR's) if it has any.

    Args:
        algorithm, episode, inner_lr, inner_steps, first_order, vectorize, loss_fn, step_weights: as for
            ``meta_batch_loss``.
        max_tasks_per_chunk: as for ``chunk_gradients``.
        model: the meta-learned model; its parameters are updated in place by the optimizer.
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters (and learned rates).
        params: the meta-parameters, if not ``dict(model.named_parameters())``: e.g. with MAML++'s
            per-step BatchNorm copies (``metagrad.per_step.per_step_bn_params``); the optimizer holds them.

    Returns:
        The ``MetaBatchOutput`` of the step (computed before the update; its loss is detached, the
        meta-gradient having been back-propagated already).

    Raises:
        TrainingError: the loss is NaN or infinite (the parameters are left unchanged).
    """
    loop = InnerLoop(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, first_order=bool(first_order),
                     loss_fn=loss_fn, step_weights=step_weights)
    optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters()) if params is None else params
    buffers = dict(model.named_buffers())
    out, grads = _chunk_gradients(loop, model, params, buffers, episode, vectorize=vectorize,
                                  max_tasks_per_chunk=max_tasks_per_chunk)
    if not torch.isfinite(out.loss):
        raise TrainingError(f"meta-training loss is {out.loss.item()}; lower meta_lr or inner_lr")
    set_gradients({**params, **meta_rates(loop.inner_lr)}, grads / episode.num_tasks)
    optimizer.step()
    return out


def chunk_gradients(
    algorithm: str,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    episode: Episode,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    first_order: bool | None = None,
    vectorize: bool = True,
    max_tasks_per_chunk: int | None = None,
    loss_fn: LossFn | None = None,
    step_weights: StepWeights = None,
) -> tuple[MetaBatchOutput, Tensor]:
    """The meta-gradient of a meta-batch, computed chunk of tasks by chunk, each back-propagated at once.

    Only one chunk's graph is alive at a time (as learn2learn back-propagates task by task), so the
    peak memory is a chunk's, not the whole meta-batch's. The chunk size is
    ``algorithms.batched.tasks_per_chunk`` for the batched strategy (cache-sized on CPU, the whole
    meta-batch on CUDA) and the whole meta-batch otherwise; it depends on the tasks' shapes, not on
    their number. ``max_tasks_per_chunk`` caps it, for any strategy: 1 holds one task's graph at a time
    (learn2learn's peak memory), at the cost of the speed that batching brings.

    The chunks' gradients are added in float64, which is exact for a few float32 terms of similar
    magnitude: the sum does not depend on the order of the additions, so processes that each sum a
    share of the chunks and then all-reduce (in float64) get the same bits as one process.

    Learned inner rates (tensors of ``inner_lr`` that require grad: Meta-SGD's, LSLR's) are
    meta-parameters too: their gradient follows the parameters' in the flat result, in the order of
    ``meta_rates(inner_lr)``.

    Args:
        max_tasks_per_chunk: at most this many tasks per chunk; None for the automatic size.
        Others: as for ``meta_batch_loss``.

    Returns:
        ``(out, grad)``: the detached ``MetaBatchOutput`` and the gradient of the SUM of the tasks' query
        losses, flattened over ``params`` then the learned rates, in that order: (P + R,) float64, the
        order of ``{**params, **meta_rates(inner_lr)}``. Divide by the number of tasks for the
        meta-gradient of the mean loss (``set_gradients`` casts it back).
    """
    loop = InnerLoop(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, first_order=bool(first_order),
                     loss_fn=loss_fn, step_weights=step_weights)
    return _chunk_gradients(loop, model, params, buffers, episode, vectorize=vectorize,
                            max_tasks_per_chunk=max_tasks_per_chunk)


def _chunk_gradients(loop: InnerLoop, model: nn.Module, params: Params, buffers: Buffers, episode: Episode, *,
                     vectorize: bool, max_tasks_per_chunk: int | None) -> tuple[MetaBatchOutput, Tensor]:
    # chunk_gradients once its settings are checked
    strategy = strategy_for(loop.algorithm, model, params, buffers, vectorize=vectorize, episode=episode)
    chunk = tasks_per_chunk(model, episode) if strategy == "batched" else episode.num_tasks
    if max_tasks_per_chunk is not None:
        if max_tasks_per_chunk < 1:
            raise ValueError(f"max_tasks_per_chunk must be at least 1 (or None), got {max_tasks_per_chunk}")
        chunk = min(chunk, max_tasks_per_chunk)
    wrt = {**params, **meta_rates(loop.inner_lr)}  # the model's parameters, then the learned rates
    names = list(wrt)
    trainable = [n for n in names if wrt[n].requires_grad]
    frozen = _frozen(params)
    losses, accs = [], []
    total = torch.zeros(sum(p.numel() for p in wrt.values()), dtype=torch.float64,
                        device=next(iter(params.values())).device)
    for start in range(0, episode.num_tasks, chunk):
        part = episode.slice(start, start + chunk)
        try:
            task_loss, task_acc = _task_losses(loop, model, params, buffers, part, strategy=strategy,
                                               frozen=frozen)
            chunk_grads = dict(zip(trainable, torch.autograd.grad(
                task_loss.sum(), [wrt[n] for n in trainable], allow_unused=True)))
        except RuntimeError as err:  # in the outer backward: where a missing second derivative shows
            if (explained := _no_second_derivative(err, model)) is not None:
                raise explained from err
            raise
        total += torch.cat([  # zeros for frozen parameters and for those the loss does not use
            (g if (g := chunk_grads.get(n)) is not None else torch.zeros_like(wrt[n])).reshape(-1)
            for n in names
        ]).double()
        losses.append(task_loss.detach())
        accs.append(task_acc.detach())
    task_losses_ = torch.cat(losses)
    return MetaBatchOutput(task_losses_.mean(), task_losses_, _accuracies(torch.cat(accs), episode)), total


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
