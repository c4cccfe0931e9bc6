"""Building blocks of metagrad's networks: each layer runs one task or a whole meta-batch of tasks.

Single task (the default): a layer takes (B, ...) inputs and its module-shaped parameters, as torch's
layers do. Inside ``task_batch(T)`` the same layer takes (T, B, ...) inputs, and each of its parameters
is either shared by all tasks (the module's shape) or given per task (one more, leading dimension T, as
the inner loop's adapted weights are); it computes every task's output in one pass and returns
(T, B, ...). The batched strategy (``metagrad.algorithms.batched``) enters the context around
``torch.func.functional_call(model, params, (x,))``, so a network written once from these layers, with
any forward of its own, runs on a whole meta-batch.

Between layers the task dimension is explicit, so code between them (``x.flatten(-3)``,
``torch.cat(..., dim=-3)``, a residual add, an elementwise activation) sees per-task shapes and cannot
mix tasks. Packing tasks into channels happens inside a layer, on views of one memory layout: the
activations of a convolution are (B, T, C, H, W) contiguous, which is at once

* (B, T*C, H, W): task t owns channels [t*C, (t+1)*C), so per-task weights are ONE grouped convolution
  (``groups=T``), and torch's fused ``F.batch_norm(training=True)`` gives each task its own statistics
  (outside vmap its double backward is torch's own and exact);
* (B*T, C, H, W), image-major (image b of every task, then image b + 1): with shared weights (ANIL's
  body) one ordinary convolution over every task's images, faster on CPU than a grouped one;
* (T, B, C, H, W) by ``transpose(0, 1)``: what a layer returns and the next one reads back, both views.

Linear layers keep (T, B, F) and run a batched matrix product (``torch.baddbmm``) with per-task weights,
``F.linear`` with shared ones; max-pooling, flattening and the spatial mean act per task on views.

BatchNorm always normalizes with the statistics of the batch it is given (no running statistics, no
buffers). Single task, it is written out from the batch mean and (biased) variance instead of calling
``F.batch_norm``: in torch 2.13, ``F.batch_norm(training=True)`` under ``torch.func.vmap`` inside a
second-order ``torch.func.grad`` returns wrong meta-gradients (the forward is right), while this
formulation is exact (``tests/models/test_layers.py`` checks it against finite differences and against
the per-task loop). The vmap strategy runs these layers single-task, one task per vmapped slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.errors import ConfigError

__all__ = ["BN_EPS", "NORM_INITS", "PARAMETER_LAYERS", "TASK_SAFE_MODULES", "BatchNorm", "Conv2d",
           "ConvBlock", "Flatten", "Linear", "LinearBlock", "MaxPool2d", "SpatialMean", "batched_tasks",
           "check_norm_init", "fc_init_", "maml_init_", "task_batch", "task_batch_obstacle"]

BN_EPS = 1e-3
"""BatchNorm epsilon of learn2learn's few-shot networks (torch's default is 1e-5)."""

NORM_INITS = ("learn2learn", "ones")
"""How a conv block's BatchNorm scale starts: learn2learn's U[0, 1), or 1 (torch's default).

MAML's TensorFlow code has no BatchNorm scale at all (``tf.contrib.layers.batch_norm`` with its
default ``scale=False``), which is a scale of 1 that never changes; "ones" starts there.
"""

_TASKS: ContextVar[int | None] = ContextVar("metagrad_batched_tasks", default=None)


@contextlib.contextmanager
def task_batch(tasks: int) -> Iterator[None]:
    """Within this context metagrad's layers take (T, B, ...) inputs of ``tasks`` tasks (see the module doc).

    Example:
        >>> with task_batch(4):  # params: each tensor of its module's shape or (4, ...) per task
        ...     logits = torch.func.functional_call(model, params, (x,))  # x (4, B, C, H, W) -> (4, B, N)
    """
    token = _TASKS.set(tasks)
    try:
        yield
    finally:
        _TASKS.reset(token)


def batched_tasks() -> int | None:
    """The number of tasks T of the enclosing ``task_batch``, or None outside one (single task)."""
    return _TASKS.get()


def _per_task(p: Tensor, shared_dim: int, tasks: int) -> Tensor:
    """(…) shared or (T, …) per task -> (T, …); a shared tensor is expanded (a view, no copy)."""
    return p.expand(tasks, *p.shape) if p.dim() == shared_dim else p


def _check_input(x: Tensor, tasks: int, layer: nn.Module, dims: str) -> None:
    if x.dim() < 2 or x.shape[0] != tasks:
        raise ValueError(f"{type(layer).__name__} inside task_batch({tasks}) takes (T, B, {dims}) inputs "
                         f"with T = {tasks}, got {tuple(x.shape)}")


def _pack(x: Tensor) -> Tensor:
    """(T, B, C, ...) -> (B, T*C, ...): task t owns channels [t*C, (t+1)*C). A view when x is an unpacked
    layer output; a copy only for a contiguous (T, B, ...) input such as the episode's images."""
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def _unpack(packed: Tensor, batch: int, tasks: int) -> Tensor:
    """(B, T*C, ...) or (B*T, C, ...), contiguous -> the (T, B, C, ...) view of the same memory (no copy)."""
    return packed.view(batch, tasks, -1, *packed.shape[2:]).transpose(0, 1)


def check_norm_init(norm_init: str, name: str = "norm_init") -> None:
    """Raise ConfigError unless ``norm_init`` is one of ``NORM_INITS``; the message calls it ``name``."""
    if norm_init not in NORM_INITS:
        raise ConfigError(f"unknown {name} {norm_init!r}; valid: {', '.join(NORM_INITS)}")


def maml_init_(layer: nn.Conv2d | nn.Linear) -> None:
    """Xavier-uniform weight, zero bias: learn2learn's ``maml_init_``, drawn from torch's generator."""
    nn.init.xavier_uniform_(layer.weight, gain=1.0)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def fc_init_(layer: nn.Linear) -> None:
    """Truncated normal weight (std 0.01, cut at 2 std), zero bias: learn2learn's ``fc_init_``.

    learn2learn draws these from ``scipy.stats.truncnorm`` (numpy's global generator); we draw them
    from torch's, so ``torch.manual_seed`` alone makes a model reproducible.
    """
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and initialization) that also runs a meta-batch.

    Inside ``task_batch(T)``: x (T, B, C_in, H, W) -> (T, B, C_out, H', W'), a view of a contiguous
    (B, T, C_out, H', W') result. Per-task weight (T, C_out, C_in/groups, kh, kw) or bias (T, C_out): one
    grouped convolution of ``T * groups`` groups over (B, T*C_in, H, W). Shared weight and bias: one
    ordinary convolution over (B*T, C_in, H, W), image-major.
    """

    def forward(self, x: Tensor) -> Tensor:
        tasks = batched_tasks()
        if tasks is None:
            return super().forward(x)
        _check_input(x, tasks, self, "C, H, W")
        batch = x.shape[1]
        weight, bias = self.weight, self.bias
        if weight.dim() == 4 and (bias is None or bias.dim() == 1):
            # (B*T, C_in, H, W), image b*T + t = task t's image b
            images = x.transpose(0, 1).reshape(batch * tasks, *x.shape[2:])
            return _unpack(self._conv_forward(images, weight, bias), batch, tasks)
        weight = _per_task(weight, 4, tasks)
        weight = weight.reshape(tasks * weight.shape[1], *weight.shape[2:])  # (T*C_out, C_in/groups, kh, kw)
        if bias is not None:
            bias = _per_task(bias, 1, tasks).reshape(-1)  # (T*C_out,)
        packed = _pack(x)  # (B, T*C_in, H, W)
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward: pad each channel, then no padding
            packed = F.pad(packed, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: str | tuple[int, ...] = (0, 0)
        else:
            padding = self.padding
        out = F.conv2d(packed, weight, bias, self.stride, padding, self.dilation, tasks * self.groups)
        return _unpack(out, batch, tasks)  # (B, T*C_out, H', W') -> (T, B, C_out, H', W')


class Linear(nn.Linear):
    """``nn.Linear`` (same arguments, parameters and initialization) that also runs a meta-batch.

    Inside ``task_batch(T)``: x (T, B, ..., F_in) -> (T, B, ..., F_out); ``F.linear`` with a shared weight
    and bias, one batched matrix product (``torch.baddbmm``) when either is per task ((T, F_out, F_in),
    (T, F_out)).
    """

    def forward(self, x: Tensor) -> Tensor:
        tasks = batched_tasks()
        weight, bias = self.weight, self.bias
        if tasks is None or (weight.dim() == 2 and (bias is None or bias.dim() == 1)):
            return super().forward(x)
        _check_input(x, tasks, self, "..., F")
        weight = _per_task(weight, 2, tasks).transpose(1, 2)  # (T, F_in, F_out)
        rows = x.reshape(tasks, -1, x.shape[-1])  # (T, B*..., F_in); a view for (T, B, F)
        if bias is None:
            out = torch.bmm(rows, weight)
        else:
            out = torch.baddbmm(_per_task(bias, 1, tasks).unsqueeze(1), rows, weight)
        return out.view(*x.shape[:-1], out.shape[-1])  # (T, B, ..., F_out)


class BatchNorm(nn.Module):
    """BatchNorm that always normalizes with the statistics of the batch it is given.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the mean and the biased variance taken
    over every dimension but the channel dimension 1. There are no running statistics and no buffers:
    train and test behave the same, so each task (each call, or each vmapped slice) is normalized with
    its own statistics. This is the transductive setting of MAML and learn2learn.

    Inside ``task_batch(T)``: x (T, B, C) or (T, B, C, H, W), weight and bias (C,) shared or (T, C) per
    task; each task's statistics are its own (fused ``F.batch_norm`` on (B, T*C, ...)).

    Args:
        num_features: number of channels C.
        eps: added to the variance; learn2learn's few-shot networks use 1e-3.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x``: (B, C) or (B, C, H, W); (T, B, C) or (T, B, C, H, W) inside ``task_batch``."""
        tasks = batched_tasks()
        if tasks is not None:
            _check_input(x, tasks, self, "C, ...")
            weight, bias = self.packed_parameters(tasks)
            # (B, T*C, ...): each channel belongs to one task, so the statistics are per task
            out = F.batch_norm(_pack(x), None, None, weight, bias, training=True, eps=self.eps)
            return _unpack(out, x.shape[1], tasks)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast per-channel vectors over (B, C, ...)
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        var = centered.square().mean(dim=dims, keepdim=True)  # biased, as BatchNorm normalizes
        return centered * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)

    def packed_parameters(self, tasks: int) -> tuple[Tensor, Tensor]:
        """Weight and bias as (T*C,) vectors for the packed (B, T*C, ...) layout of ``tasks`` tasks."""
        return _per_task(self.weight, 1, tasks).reshape(-1), _per_task(self.bias, 1, tasks).reshape(-1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _add_at(base: Tensor, positions: Tensor, values: Tensor) -> Tensor:
    """``base`` with ``values`` added at ``positions`` along its last dimension: a pool's gradient sent back
    to the selected elements. In place in a first-order backward (``base`` is the backward's own new
    buffer); out of place under ``create_graph``, where the second-order graph needs ``base``."""
    if torch.is_grad_enabled():
        return base.scatter_add(-1, positions, values)
    return base.scatter_add_(-1, positions, values)


class _MaxPool(torch.autograd.Function):
    """2D max-pooling whose backward keeps only the argmax indices, not the input.

    torch's own max-pool saves its whole input for the backward, which uses it only for its shape: on
    Mini-ImageNet's first block that is a 68 MB activation per task held until the backward. Here the
    gradient is scattered (added, for overlapping windows) to the saved indices, which is what torch's
    backward computes; written in differentiable operations, so the inner loop's second-order graph
    and ``torch.func``'s transforms go through it (``generate_vmap_rule``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: bool) -> tuple[Tensor, Tensor]:
        return F.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.input_shape = inputs[0].shape

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        (indices,) = ctx.saved_tensors
        shape = ctx.input_shape
        planes = grad.reshape(-1, grad.shape[-2] * grad.shape[-1])  # one row per channel plane
        rows = indices.reshape(planes.shape)  # positions within the input's plane
        grad_input = _add_at(grad.new_zeros(planes.shape[0], shape[-2] * shape[-1]), rows, planes)
        return grad_input.view(shape), None, None, None, None, None


class _NormMaxPool(torch.autograd.Function):
    """BatchNorm with the batch's statistics, then max-pooling, without BatchNorm's full-size output.

    BatchNorm is a per-channel increasing map where its weight is >= 0 and a decreasing one where it is
    negative, so each window's largest output sits where the convolution's output x is largest (or,
    for a negative weight, smallest). The pool therefore runs on x (on -x in negative channels) and
    only the pooled values are normalized. The backward builds x's gradient in one full-size buffer
    from the pooled gradient: BatchNorm's backward at the selected positions, with its mean terms
    summed over the pooled elements, where alone the normalized gradient is nonzero. In a first-order
    backward it is computed in place; under ``create_graph`` in differentiable operations, with the
    statistics recomputed from x, so the second-order graph is exact.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, kernel_size: Any, stride: Any,
                padding: Any, dilation: Any, ceil_mode: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # biased; 3x torch.var_mean's speed
        invstd = torch.rsqrt(var + eps)
        negative = weight < 0
        sign = torch.where(negative, -1.0, 1.0).to(x.dtype)
        # on the CPU skip the full-size sign flip when no weight is negative (the usual case)
        source = x if x.device.type == "cpu" and not bool(negative.any()) else x * sign.view(1, -1, 1, 1)
        pooled, indices = F.max_pool2d_with_indices(source, kernel_size, stride, padding, dilation, ceil_mode)
        # pooled = sign * x at each window's selection: y = weight * invstd * (x - mean) + bias
        scale = (weight * invstd * sign).view(1, -1, 1, 1)
        shift = (bias - weight * invstd * mean).view(1, -1, 1, 1)
        return pooled.mul_(scale).add_(shift), indices, mean, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, indices, mean, invstd = output
        ctx.mark_non_differentiable(indices, mean, invstd)
        ctx.save_for_backward(inputs[0], inputs[1], indices, mean, invstd)
        ctx.eps = inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, indices, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a create_graph backward: the statistics as functions of x
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            invstd = torch.rsqrt(var + ctx.eps)
        count = x.numel() // x.shape[1]  # elements per channel
        planes = x.flatten(2)  # (B, C, H*W); positions = the indices
        rows = indices.flatten(2)
        normalized = (planes.gather(2, rows) - mean.view(1, -1, 1)) * invstd.view(1, -1, 1)
        grad_rows = grad.flatten(2)
        grad_bias = grad_rows.sum(dim=(0, 2))
        grad_weight = (grad_rows * normalized).sum(dim=(0, 2))
        # dL/dx = invstd * (g - mean(g) - xhat * mean(g * xhat)), g = weight * grad scattered to the
        # selections: a full-size affine map of x, plus the scattered part
        centre = weight * grad_bias / count
        slope = weight * grad_weight / count
        coef_x = (-invstd.square() * slope).view(1, -1, 1)
        const = (invstd * (mean * invstd * slope - centre)).view(1, -1, 1)
        scattered = (weight * invstd).view(1, -1, 1) * grad_rows
        grad_x = _add_at(torch.addcmul(const, planes, coef_x), rows, scattered)
        return grad_x.view(x.shape), grad_weight, grad_bias, None, None, None, None, None, None


def _norm_max_pool(norm: BatchNorm, pool: nn.MaxPool2d, x: Tensor, tasks: int) -> Tensor:
    """``pool(norm(x))`` inside ``task_batch(tasks)`` for a (T, B, C, H, W) x, by ``_NormMaxPool``."""
    _check_input(x, tasks, norm, "C, H, W")
    weight, bias = norm.packed_parameters(tasks)
    out = _NormMaxPool.apply(_pack(x), weight, bias, norm.eps, pool.kernel_size, pool.stride, pool.padding,
                             pool.dilation, pool.ceil_mode)[0]
    return _unpack(out, x.shape[1], tasks)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, values and gradients) that also runs a meta-batch.

    Its backward keeps only the argmax indices, not the input (``_MaxPool``). Inside ``task_batch(T)``:
    (T, B, C, H, W) -> (T, B, C, H', W'), each channel pooled on its own.
    """

    def _pool(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out, indices = _MaxPool.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                      self.ceil_mode)
        return (out, indices) if self.return_indices else out

    def forward(self, x: Tensor) -> Tensor:
        tasks = batched_tasks()
        if tasks is None:
            return self._pool(x)
        _check_input(x, tasks, self, "C, H, W")
        out = self._pool(_pack(x))  # (B, T*C, H', W')
        if self.return_indices:  # indices are positions within each channel's plane: the same per task
            return _unpack(out[0], x.shape[1], tasks), _unpack(out[1], x.shape[1], tasks)
        return _unpack(out, x.shape[1], tasks)


class Flatten(nn.Flatten):
    """``nn.Flatten`` that also runs a meta-batch: its dimensions count from B, after the task dimension."""

    def forward(self, x: Tensor) -> Tensor:
        if batched_tasks() is None:
            return super().forward(x)
        start, end = (d + 1 if d >= 0 else d for d in (self.start_dim, self.end_dim))
        return x.flatten(start, end)  # (T, B, C, h, w) -> (T, B, C*h*w): a view of an unpacked layer output


class SpatialMean(nn.Module):
    """(..., C, H, W) -> (..., C): mean over the spatial positions (the MAML paper's Omniglot CNN).

    Counted from the end, so the same code serves (B, C, H, W) and a meta-batch's (T, B, C, H, W).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class ConvBlock(nn.Module):
    """3x3 convolution (padding 1), BatchNorm, ReLU, then a 2x2 max-pool or a stride-2 convolution.

    Initialization (learn2learn's ``ConvBlock``): convolution xavier-uniform with zero bias;
    BatchNorm weight uniform in [0, 1) (or 1, see ``norm_init``), bias zero. All drawn from torch's
    generator.

    Args:
        in_channels: input channels.
        out_channels: filters.
        strided: True for the MAML paper's Omniglot variant (stride-2 convolution, no pooling);
            False for a stride-1 convolution followed by a 2x2 max-pool.
        norm_init: "learn2learn" (BatchNorm weight U[0, 1)) or "ones" (weight 1); see ``NORM_INITS``.
            "ones" draws nothing for it, so the next draws of torch's generator come earlier.

    Raises:
        ConfigError: ``norm_init`` is not one of ``NORM_INITS``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, strided: bool = False,
                 norm_init: str = "learn2learn") -> None:
        super().__init__()
        check_norm_init(norm_init)
        self.strided = strided
        self.conv = Conv2d(in_channels, out_channels, 3, stride=2 if strided else 1, padding=1)
        self.norm = BatchNorm(out_channels)  # weight 1, bias 0
        self.pool = nn.Identity() if strided else MaxPool2d(2)
        maml_init_(self.conv)
        if norm_init == "learn2learn":
            nn.init.uniform_(self.norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W') with H' = ceil(H/2) if strided else floor(H/2).

        ReLU after the max-pool: the same values and gradients as before it (both are monotone, and a
        window's gradient goes to its first largest element either way), on a quarter of the elements.
        Inside ``task_batch`` BatchNorm and a max-pool run as one operation that pools the convolution's
        output and normalizes only the pooled values (``_NormMaxPool``): the same values and gradients
        without a full-size BatchNorm output or pool gradient. Where a BatchNorm weight is exactly 0 every
        window ties; its gradient is then the limit from above rather than the first element's.
        """
        x = self.conv(x)
        tasks = batched_tasks()
        if tasks is not None and isinstance(self.pool, MaxPool2d) and not self.pool.return_indices:
            return F.relu(_norm_max_pool(self.norm, self.pool, x, tasks))
        return F.relu(self.pool(self.norm(x)))


class LinearBlock(nn.Sequential):
    """Linear, BatchNorm, ReLU (learn2learn's ``LinearBlock``: truncated-normal linear, BatchNorm 1/0)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        linear = Linear(in_features, out_features)
        fc_init_(linear)
        super().__init__(linear, BatchNorm(out_features), nn.ReLU())


PARAMETER_LAYERS = (Conv2d, Linear, BatchNorm)
"""metagrad's layers with parameters: each takes shared or per-task parameters inside ``task_batch``."""

TASK_SAFE_MODULES = (
    MaxPool2d, Flatten, SpatialMean, nn.Identity, nn.Dropout, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Sequential, nn.ModuleList,
    nn.ModuleDict,
)
"""Modules without parameters that act on a meta-batch's (T, B, ...) as on each task's (B, ...):
metagrad's shape layers, elementwise functions (dropout draws a mask per element, so per task) and
containers."""


def task_batch_obstacle(model: nn.Module) -> str | None:
    """Why ``model`` cannot run inside ``task_batch`` as it is built, or None if every module can.

    Every parameter must belong to one of metagrad's layers (``PARAMETER_LAYERS``) and every other leaf
    module be task-safe (``TASK_SAFE_MODULES``); the model and its own modules may have any forward
    (the batched strategy checks once that it does not mix tasks). Buffers are refused: metagrad's
    layers have none, and a user's own buffer may hold per-call state.
    """
    for name, module in model.named_modules():
        where = f"{name} ({type(module).__name__})" if name else type(module).__name__
        if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, PARAMETER_LAYERS):
            return f"{where} has parameters of its own and is not one of metagrad's layers"
        if any(True for _ in module.buffers(recurse=False)):
            return f"{where} has buffers"
        if (not isinstance(module, PARAMETER_LAYERS + TASK_SAFE_MODULES)
                and not any(True for _ in module.children())):
            return f"{where} is not one of metagrad's layers"
    return None
