"""How a forward runs over a meta-batch: the one thing the strategies supply to the engine.

* ``"batched"``: the model's own forward runs once on all tasks inside ``models.layers.task_batch``,
  where metagrad's layers take (T, B, ...) inputs and shared or per-task (T, ...) parameters (grouped
  convolutions, a fused per-task BatchNorm, batched matrix products). For networks built from those layers
  (``layers.task_batch_obstacle`` is None) whose forward keeps tasks apart (``batching_mismatch``,
  checked on the first meta-batch and kept per model). On CPU the tasks go in cache-sized chunks
  (``tasks_per_chunk``).
* ``"vmap"``: ``torch.func.vmap`` over tasks for any other model, under ``vmap_exact.ExactFunctions``
  (exact normalizations at any order of differentiation; running statistics replayed afterwards in the
  per-task loop's order). A model vmap cannot run exactly (``vmap_exact.loop_reason``) takes the loop.
* ``"loop"``: one task at a time, ``vectorize=False``: the reference the tests compare the others with.

The inner loop, the losses and the meta-gradient are the same code on all three
(``functional.inner_loop``, ``algorithms/base.py``).
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor, nn

from metagrad import per_step, vmap_exact
from metagrad.algorithms.base import BODY_PREFIX, Algorithm, split_body_head
from metagrad.errors import ConfigError
from metagrad.functional import forward_with
from metagrad.models import HEAD_PREFIX
from metagrad.models.layers import Conv2d, Linear, task_batch, task_batch_obstacle
from metagrad.types import Buffers, Episode, Params

__all__ = ["CPU_CHUNK_ELEMENTS", "STRATEGIES", "VMAP_RANDOMNESS", "Vmapped", "batched", "batching_mismatch",
           "looped", "strategy_for", "tasks_per_chunk"]

logger = logging.getLogger(__name__)

STRATEGIES = ("batched", "vmap", "loop")
"""How a meta-batch is computed, fastest first."""

VMAP_RANDOMNESS = "different"
"""vmap's randomness mode: each task draws its own random numbers, as independent tasks would (e.g.
different dropout masks). The loop draws them task after task from torch's generator, so a model with
dropout in train mode gets other masks on the two paths: they agree in distribution, and each computes
the exact meta-gradient of the masks it drew."""

CPU_CHUNK_ELEMENTS = 1 << 21
"""On CPU, tasks are batched in chunks whose first-layer activations (support and query) stay under
about this many elements (8 MB in float32): it bounds the memory of the chunk's graph and of BatchNorm's
double backward, and is large enough to keep two threads busy (``benchmarks/chunk_budget.py``). On CUDA
the whole meta-batch is one chunk (a GPU needs large batches to be busy)."""


def batched(module: nn.Module, params: Params, buffers: Buffers, x: Tensor, tasked: frozenset[str]) -> Tensor:
    """The batched strategy's forward: ``module`` once on all tasks (its layers see per-task tensors by
    their leading dimension)."""
    with task_batch(x.shape[0]):
        return forward_with(module, params, buffers, x)


def looped(module: nn.Module, params: Params, buffers: Buffers, x: Tensor, tasked: frozenset[str]) -> Tensor:
    """The loop strategy's forward: ``module`` on each task in turn, with that task's parameters."""
    return torch.stack([forward_with(module, {k: v[t] if k in tasked else v for k, v in params.items()},
                                     buffers, x[t]) for t in range(x.shape[0])])


class Vmapped:
    """The vmap strategy's forward, for one meta-batch: call it as a forward, then :meth:`replay`.

    Args:
        buffers: every buffer the model runs with, under the model's names (running statistics are
            recognised by identity with these tensors).
    """

    def __init__(self, buffers: Buffers) -> None:
        self.buffers = buffers
        self.calls: list[tuple[vmap_exact.ExactFunctions, tuple[Tensor, ...]]] = []

    def __call__(self, module: nn.Module, params: Params, buffers: Buffers, x: Tensor,
                 tasked: frozenset[str]) -> Tensor:
        shared = {k: v for k, v in params.items() if k not in tasked}
        modes: list[vmap_exact.ExactFunctions] = []

        def one_task(own: Params, task_x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
            with vmap_exact.exact_functions(self.buffers) as mode:
                out = forward_with(module, {**shared, **own}, buffers, task_x)
            modes.append(mode)
            return out, mode.task_stats()

        try:
            out, stats = torch.func.vmap(one_task, randomness=VMAP_RANDOMNESS)(
                {k: params[k] for k in tasked}, x)
        except RuntimeError as err:
            # what vmap says of an in-place write to a shared tensor, or of an operation it cannot batch
            if not any(s in str(err) for s in ("vmap", "captured Tensor", "functorch", "Batching rule",
                                               "in-place operation", "doesn't match the broadcast shape")):
                raise
            raise ConfigError(
                f"{type(module).__name__} cannot run vectorized over tasks: {str(err).splitlines()[0]} Pass "
                "vectorize=False (CLI: --no-vectorize) to run one task at a time, which is exact.") from err
        self.calls.append((modes[0], stats))
        return out

    def replay(self, tasks: int) -> None:
        """Update the running statistics as the per-task loop would have (``vmap_exact``)."""
        if any(mode.updates or mode.counts for mode, _ in self.calls):
            vmap_exact.replay_running_stats(self.buffers, self.calls, tasks)


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
    for which, tensors in (("shared", params), ("per-task", _distinct_per_task(params, x.shape[0]))):
        tasked = frozenset(tensors) if which == "per-task" else frozenset()
        expected = looped(module, tensors, {}, x, tasked)
        try:
            got = batched(module, tensors, {}, x, tasked)
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


def batching_mismatch(model: nn.Module, params: Params, episode: Episode, *, head_only: bool) -> str | None:
    """Why ``model`` computes something else on the batched strategy than task by task, or None if not.

    Runs the model (with ``head_only``, its ``features``, then its ``classifier`` on their output, as an
    algorithm adapting the head alone calls them) on the support sets of two tasks of ``episode``, inside
    ``task_batch(2)`` and task by task, once with ``params`` shared and once with distinct per-task copies.
    Cheap: forwards of two tasks, without gradients, with dropout off (eval mode) meanwhile; the model is
    left as it was.
    """
    x = episode.support_x[:2]  # (2, B, ...): two tasks (the one task twice if there is only one)
    # finite values, so that a diverged run or NaN images still give a verdict on the shapes alone
    x = (torch.cat([x, x]) if x.shape[0] == 1 else x).nan_to_num(0.0, 0.0, 0.0)
    params = {k: v.detach().nan_to_num(0.0, 0.0, 0.0) for k, v in params.items()}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if not head_only:
                return _mismatch(model, params, x)
            body, head = split_body_head(model, params)
            body = {k[len(BODY_PREFIX):]: v for k, v in body.items()}
            features, classifier = model.get_submodule("features"), model.get_submodule("classifier")
            why = _mismatch(features, body, x)
            if why is not None:
                return why
            return _mismatch(classifier, {k[len(HEAD_PREFIX):]: v for k, v in head.items()},
                             looped(features, body, {}, x, frozenset()))
    finally:
        for m, training in modes.items():
            m.training = training


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[bool, str | None]] = weakref.WeakKeyDictionary()
"""model -> {head_only: why its forward cannot run batched, or None}: the check of its first meta-batch."""

_LOGGED: set[tuple[type, str, str]] = set()


def _log_once(model: nn.Module, strategy: str, why: str) -> None:
    key = (type(model), strategy, why)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s runs on the %s strategy: %s", type(model).__name__, strategy, why)


def frozen(params: Params) -> frozenset[str]:
    """Names of frozen parameters (``requires_grad=False`` beside others that require it).

    The inner loop leaves them as they are, as learn2learn's ``adapt`` does by default; when no
    parameter requires grad (detached copies, as in evaluation) every one is adapted.
    """
    if not any(p.requires_grad for p in params.values()):
        return frozenset()
    return frozenset(k for k, p in params.items() if not p.requires_grad)


def head_only(algorithm: Algorithm, model: nn.Module, params: Params) -> bool:
    """Whether ``algorithm`` adapts only the head of ``model`` (and so runs the body once)."""
    keys = algorithm.adapted(model, list(per_step.shared(params)))
    head = bool(keys) and all(k.startswith(HEAD_PREFIX) for k in keys)
    return head and not per_step.per_step_copies(params)


def _batched_obstacle(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers,
                      episode: Episode | None) -> str | None:
    """Why the batched strategy cannot run ``algorithm`` on ``model`` with these tensors, or None."""
    reason = task_batch_obstacle(model)
    if reason is not None:
        return f"not built from metagrad's layers: {reason}"
    names = dict(model.named_parameters())
    shared = per_step.at_step(params, 0)  # BNWB's per-step copies under the model's names
    if buffers or shared.keys() != names.keys() or any(shared[k].shape != v.shape for k, v in names.items()):
        return "the parameters or buffers passed are not the model's own"
    if frozen(params):
        return "some parameters are frozen"
    head = head_only(algorithm, model, params)
    verdicts = _VERIFIED.setdefault(model, {})
    if head not in verdicts and episode is not None:
        verdicts[head] = batching_mismatch(model, shared, episode, head_only=head)
    return verdicts.get(head)


def strategy_for(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers, *,
                 vectorize: bool = True, episode: Episode | None = None) -> str:
    """The strategy ``vectorize`` selects for this model (see the module docstring).

    Without an episode, a model not checked yet gets the verdict of its structure. The choice is logged
    once per model class and reason.
    """
    if not vectorize:
        return "loop"
    why_not = _batched_obstacle(algorithm, model, params, buffers, episode)
    if why_not is None:
        return "batched"
    reason = vmap_exact.loop_reason(model)
    if reason is not None:
        _log_once(model, "loop", f"{reason}; one task at a time is exact but slower")
        return "loop"
    _log_once(model, "vmap", f"{why_not}; torch.func.vmap over tasks")
    return "vmap"
