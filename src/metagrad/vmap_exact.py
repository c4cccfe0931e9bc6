"""Run any model under ``torch.func.vmap`` over tasks with exact meta-gradients and running statistics.

``torch.func.vmap`` over tasks, with ``torch.func.grad`` in the inner loop, is exact for nearly all of
torch's ops, but not for the fused normalization kernels: in torch 2.13 the second-order
meta-gradient through ``batch_norm``, ``instance_norm`` and ``layer_norm`` with an affine weight is wrong
under vmap by several percent (``tests/algorithms/test_user_models.py`` shows it), and BatchNorm's
running statistics are updated in place, which vmap refuses. While a task runs under vmap,
:class:`ExactFunctions` (a ``TorchFunctionMode``, so it sees these calls whether torch's modules or the
model's own ``forward`` make them):

* computes the three normalizations from their definition (mean, biased variance, ``rsqrt``), which
  vmap differentiates exactly at any order;
* leaves running statistics alone and instead returns each BatchNorm call's batch mean and unbiased
  variance; :func:`replay_running_stats` then applies them in the order the per-task loop makes the
  calls (every call of task 0, then of task 1, ...), so the buffers end where the loop leaves them;
* counts ``num_batches_tracked.add_(1)`` instead of doing it; the replay adds the count once per task.

BatchNorm semantics are learn2learn's and a per-task loop's: a module in train mode normalizes every
forward (each support set, each inner step, each query set, per task) with that batch's statistics and,
if it tracks running statistics, updates them after each forward; in eval mode it normalizes with its
running statistics and updates nothing. ``momentum=None`` (a cumulative average whose factor torch
computes in Python from ``num_batches_tracked``) cannot be replayed, nor can InstanceNorm's running
statistics: :func:`loop_reason` sends such models to the per-task loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from metagrad.errors import ConfigError
from metagrad.types import Buffers

__all__ = ["ExactFunctions", "exact_functions", "loop_reason", "replay_running_stats"]


@dataclass(frozen=True)
class _Update:
    """One BatchNorm forward that updates running statistics: buffer names and momentum."""

    mean: str
    var: str
    momentum: float


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalize(x: Tensor, dims: list[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mean) / sqrt(var + eps) over ``dims`` with the biased variance; also returns mean and var."""
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = centered.square().mean(dim=dims, keepdim=True)
    return centered * torch.rsqrt(var + eps), mean, var


_SIGNATURES: dict[Any, tuple[str, ...]] = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                       "eps"),
    F.instance_norm: ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
                      "momentum", "eps"),
    torch.instance_norm: ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats",
                          "momentum", "eps"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    torch.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
}
_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
             "use_input_stats": True, "momentum": 0.1, "eps": 1e-5}


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name, with torch's defaults."""
    return {**_DEFAULTS, **dict(zip(_SIGNATURES[func], args)), **kwargs}


class ExactFunctions(TorchFunctionMode):
    """Exact normalizations and deferred running-statistics updates for one vmapped task function.

    Args:
        buffers: the buffers the model runs with (name -> tensor); running statistics are recognised by
            identity with these tensors.
    """

    def __init__(self, buffers: Buffers) -> None:
        super().__init__()
        self._names = {id(t): name for name, t in buffers.items()}
        self._counters = {id(t) for name, t in buffers.items()
                          if name.rpartition(".")[2] == "num_batches_tracked"}
        self.updates: list[_Update] = []  # one per BatchNorm call that updates running statistics
        self.stats: list[Tensor] = []
        self.counts: dict[str, int] = {}  # num_batches_tracked name -> increments per task

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.batch_norm, torch.batch_norm):
            return self._batch_norm(**_bind(func, args, kwargs))
        if func in (F.instance_norm, torch.instance_norm):
            return self._instance_norm(**_bind(func, args, kwargs))
        if func in (F.layer_norm, torch.layer_norm):
            a = _bind(func, args, kwargs)
            x, shape = a["input"], list(a["normalized_shape"])
            y, _, _ = _normalize(x, list(range(x.dim() - len(shape), x.dim())), a["eps"])
            return _affine(y, a["weight"], a["bias"], shape)
        if func is torch.Tensor.add_ and id(args[0]) in self._counters:  # num_batches_tracked.add_(1)
            name = self._names[id(args[0])]
            self.counts[name] = self.counts.get(name, 0) + int(args[1] if len(args) > 1 else kwargs["other"])
            return args[0]
        return func(*args, **kwargs)

    def _batch_norm(self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float, eps: float,
                    **_: Any) -> Tensor:
        x = input
        shape = [1, -1] + [1] * (x.dim() - 2)  # per-channel vectors broadcast over (B, C, ...)
        if training or running_mean is None:
            y, mean, var = _normalize(x, [0, *range(2, x.dim())], eps)
            if training and running_mean is not None and running_var is not None:
                self._record(running_mean, running_var, momentum, mean, var, x.numel() // x.shape[1])
        else:
            assert running_var is not None, "batch_norm in eval mode without running statistics"
            y = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
        return _affine(y, weight, bias, shape)

    def _instance_norm(self, input: Tensor, running_mean: Tensor | None, weight: Tensor | None,
                       bias: Tensor | None, use_input_stats: bool, eps: float, **_: Any) -> Tensor:
        if not use_input_stats or running_mean is not None:
            raise ConfigError("InstanceNorm with running statistics cannot run vectorized over tasks; "
                              "pass vectorize=False (CLI: --no-vectorize) to run one task at a time")
        y = _normalize(input, list(range(2, input.dim())), eps)[0]
        return _affine(y, weight, bias, [1, -1] + [1] * (input.dim() - 2))

    def _record(self, running_mean: Tensor, running_var: Tensor, momentum: float, mean: Tensor, var: Tensor,
                count: int) -> None:
        mean_name, var_name = self._names.get(id(running_mean)), self._names.get(id(running_var))
        if mean_name is None or var_name is None:
            raise ConfigError("a BatchNorm updates running statistics that are not among the buffers passed "
                              "to metagrad; pass dict(model.named_buffers()) as buffers")
        self.updates.append(_Update(mean_name, var_name, float(momentum)))
        unbiased = var * (count / max(count - 1, 1))  # running_var tracks the unbiased variance, as torch's
        self.stats += [mean.detach().reshape(-1), unbiased.detach().reshape(-1)]

    def task_stats(self) -> tuple[Tensor, ...]:
        """The recorded (mean, unbiased variance) pairs of every updating call, in call order."""
        return tuple(self.stats)


@contextlib.contextmanager
def exact_functions(buffers: Buffers) -> Iterator[ExactFunctions]:
    """Activate :class:`ExactFunctions` for ``buffers``."""
    with ExactFunctions(buffers) as mode:
        yield mode


@torch.no_grad()
def replay_running_stats(buffers: Buffers, calls: list[tuple[ExactFunctions, tuple[Tensor, ...]]],
                         tasks: int) -> None:
    """Apply the recorded updates to ``buffers`` in place, task by task, as the per-task loop would.

    Args:
        buffers: the buffers the model ran with (updated in place).
        calls: one ``(mode, stats)`` per vmapped forward, in call order: the mode that ran it (its
            ``updates`` and ``counts``) and what it returned from ``mode.task_stats()``: (T, C) tensors,
            mean and unbiased variance alternating, one pair per entry of ``mode.updates``.
        tasks: T.
    """
    updates = [u for mode, _ in calls for u in mode.updates]
    stats = [t for _, call_stats in calls for t in call_stats]
    # n updates r <- (1 - m) r + m x_k in a row are r (1 - m)^n + sum_k m (1 - m)^(n-1-k) x_k: one weighted
    # sum per buffer over its statistics in the loop's order (task-major, then call order).
    by_buffer: dict[tuple[str, str, float], list[int]] = {}
    for i, update in enumerate(updates):
        by_buffer.setdefault((update.mean, update.var, update.momentum), []).append(i)
    if len({name for key in by_buffer for name in key[:2]}) < 2 * len(by_buffer):  # F.batch_norm by hand
        raise ConfigError("one BatchNorm buffer is updated with two momenta; pass vectorize=False "
                          "(CLI: --no-vectorize) to run one task at a time")
    for (mean_name, var_name, m), indices in by_buffer.items():
        n = tasks * len(indices)
        for name, offset in ((mean_name, 0), (var_name, 1)):
            buffer = buffers[name]
            seq = torch.stack([stats[2 * i + offset] for i in indices], dim=1).reshape(n, -1)  # (T*calls, C)
            weights = m * (1 - m) ** torch.arange(n - 1, -1, -1, dtype=torch.float64, device=seq.device)
            total = (weights[:, None] * seq.double()).sum(dim=0) + (1 - m) ** n * buffer.double().reshape(-1)
            buffer.copy_(total.view_as(buffer).to(buffer.dtype))
    for mode, _ in calls:
        for name, count in mode.counts.items():
            buffers[name].add_(count * tasks)


def loop_reason(model: nn.Module) -> str | None:
    """Why ``model`` must run one task at a time (a layer and the reason), or None if vmap is exact."""
    for name, module in model.named_modules():
        tracking = module.training and getattr(module, "track_running_stats", False)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and tracking and module.momentum is None:
            return (f"{name or 'the model'} ({type(module).__name__}) keeps a cumulative average "
                    "(momentum=None), which vmap cannot update task by task")
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and tracking:
            return f"{name or 'the model'} ({type(module).__name__}) tracks running statistics"
        if isinstance(module, nn.RNNBase):
            return (f"{name or 'the model'} ({type(module).__name__}) runs a fused kernel that vmap "
                    "cannot batch")
    return None
