"""The standard networks run on a whole meta-batch of tasks at once, without vmap.

``task_batched_forward(plan, params, x)`` computes what ``forward_with(model, params_t, {}, x[t])``
computes for every task ``t`` of ``x`` (T, B, ...) in one pass, where each parameter is either shared by
all tasks (its module shape) or given per task (a leading T dimension, e.g. adapted weights).

How the task dimension is folded in:

* Convolutions keep activations as (B, T*C, H, W): task t owns channels [t*C, (t+1)*C). A convolution
  with per-task weights (T, C_out, C_in, k, k) is then ONE grouped convolution (``groups=T``, weight
  reshaped to (T*C_out, C_in, k, k)), and ReLU and max-pooling act per channel anyway.
* BatchNorm with batch statistics takes its mean and variance per channel over (B, H, W), and every
  channel belongs to one task, so torch's fused ``F.batch_norm(training=True)`` on this layout gives each
  task exactly its own statistics. Outside vmap its double backward is torch's own and exact (the
  reference tests check it at second order against a per-task loop and finite differences).
* Linear layers keep (T, B, F) and run as one batched matrix product (``torch.baddbmm``).

While every convolution weight is shared (ANIL's body), the images of all tasks instead go through one
ordinary convolution as (B*T, C, H, W), ordered image-major (image b of every task, then image b + 1),
so that the same memory viewed as (B, T*C, H, W) is BatchNorm's per-task layout without a copy.

Only models whose structure is known are accepted (``plan_for``); anything else returns None and the
caller falls back to vmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.models.conv4 import MiniImagenetCNN, OmniglotCNN, OmniglotFC, SpatialMean
from metagrad.models.layers import BatchNorm, ConvBlock, LinearBlock
from metagrad.types import Params

__all__ = ["BatchedPlan", "plan_for", "task_batched_forward", "task_batched_head"]

_KNOWN_MODELS = (OmniglotCNN, OmniglotFC, MiniImagenetCNN)


@dataclass(frozen=True)
class _Step:
    """One layer of the body: kind in {"flatten_input", "conv", "linear", "spatial_mean", "flatten"}."""

    kind: str
    prefix: str = ""  # parameter name prefix, e.g. "features.0."
    stride: int = 1  # conv only
    pool: bool = False  # conv only: 2x2 max-pool after ReLU
    eps: float = 0.0  # BatchNorm epsilon


@dataclass(frozen=True)
class BatchedPlan:
    """The body of a recognised model as a list of steps; the head is ``classifier.weight``/``.bias``."""

    steps: tuple[_Step, ...]


def _conv_ok(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.stride in ((1, 1), (2, 2)) and conv.bias is not None
            and conv.padding_mode == "zeros")


def plan_for(model: nn.Module) -> BatchedPlan | None:
    """The task-batched plan of one of the standard models, or None if ``model`` is anything else.

    Exact types are required (a subclass may override ``forward``), and every layer is checked, so a
    modified instance falls back to the generic path rather than computing something else.
    """
    if type(model) not in _KNOWN_MODELS or list(model.buffers()):
        return None
    if not (isinstance(model.features, nn.Sequential) and type(model.classifier) is nn.Linear
            and model.classifier.bias is not None):
        return None
    steps: list[_Step] = []
    layers = list(model.features.named_children())
    for i, (name, layer) in enumerate(layers):
        prefix = f"features.{name}."
        last = i == len(layers) - 1
        if type(layer) is ConvBlock and _conv_ok(layer.conv) and type(layer.norm) is BatchNorm:
            steps.append(_Step("conv", prefix, stride=layer.conv.stride[0], pool=not layer.strided,
                               eps=layer.norm.eps))
            if layer.strided != (layer.conv.stride == (2, 2)):
                return None
        elif (type(layer) is LinearBlock and len(layer) == 3 and type(layer[0]) is nn.Linear
              and layer[0].bias is not None and type(layer[1]) is BatchNorm and type(layer[2]) is nn.ReLU):
            steps.append(_Step("linear", prefix, eps=layer[1].eps))
        elif type(layer) is SpatialMean and last:
            steps.append(_Step("spatial_mean"))
        elif type(layer) is nn.Flatten and layer.start_dim == 1 and layer.end_dim == -1 and (i == 0 or last):
            steps.append(_Step("flatten_input" if i == 0 else "flatten"))
        else:
            return None
    kinds = [s.kind for s in steps]
    convs = "conv" in kinds
    if convs and (kinds[-1] not in ("spatial_mean", "flatten") or "linear" in kinds):
        return None
    if not convs and (kinds[:1] != ["flatten_input"] or "linear" not in kinds):
        return None
    return BatchedPlan(tuple(steps))


def _per_task(p: Tensor, shared_dim: int, tasks: int) -> Tensor:
    """(…) shared or (T, …) per task -> (T, …); a shared tensor is expanded (a view, no copy)."""
    return p.expand(tasks, *p.shape) if p.dim() == shared_dim else p


def _conv(x: Tensor, weight: Tensor, bias: Tensor, tasks: int, stride: int) -> Tensor:
    # x: (B, T*C_in, H, W); weight (C_out, C_in, 3, 3) shared or (T, C_out, C_in, 3, 3) per task.
    weight = _per_task(weight, 4, tasks)
    c_out = weight.shape[1]
    weight = weight.reshape(tasks * c_out, *weight.shape[2:])  # (T*C_out, C_in, 3, 3)
    bias = _per_task(bias, 1, tasks).reshape(tasks * c_out)  # (T*C_out,)
    return F.conv2d(x, weight, bias, stride=stride, padding=1, groups=tasks)  # (B, T*C_out, H', W')


def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor, tasks: int, eps: float) -> Tensor:
    # x: (B, T*C, ...): channel t*C + c is task t's channel c, so the statistics are per task.
    weight = _per_task(weight, 1, tasks).reshape(-1)  # (T*C,)
    bias = _per_task(bias, 1, tasks).reshape(-1)
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    # x: (T, B, F_in); weight (F_out, F_in) shared or (T, F_out, F_in); bias (F_out,) or (T, F_out).
    if weight.dim() == 2 and bias.dim() == 1:
        return F.linear(x, weight, bias)  # (T, B, F_out)
    tasks = x.shape[0]
    weight = _per_task(weight, 2, tasks)
    bias = _per_task(bias, 1, tasks)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (T, B, F_out)


def task_batched_head(params: Params, features: Tensor) -> Tensor:
    """The linear head on (T, B, D) features with shared or per-task ``classifier.*`` -> (T, B, ways)."""
    return _linear(features, params["classifier.weight"], params["classifier.bias"])


def _shared_conv_block(h: Tensor, params: Params, step: _Step, tasks: int) -> Tensor:
    # h: (B*T, C_in, H, W), image b*T + t = task t's image b. Shared weights: one ordinary convolution over
    # every task's images (faster on CPU than a grouped one). In this image order the output, contiguous
    # (B*T, C, H', W'), IS the (B, T*C, H', W') layout BatchNorm needs for per-task statistics: both
    # reshapes below are views, no copies.
    p = step.prefix
    h = F.conv2d(h, params[p + "conv.weight"], params[p + "conv.bias"], stride=step.stride, padding=1)
    batch = h.shape[0] // tasks
    c, height, width = h.shape[1:]
    h = h.view(batch, tasks * c, height, width)
    h = F.relu(_batch_norm(h, params[p + "norm.weight"], params[p + "norm.bias"], tasks, step.eps))
    if step.pool:
        h = F.max_pool2d(h, 2)
    return h.reshape(batch * tasks, c, *h.shape[2:])  # (B*T, C, H'', W'')


def task_batched_body(plan: BatchedPlan, params: Params, x: Tensor) -> Tensor:
    """The body on (T, B, ...) inputs, each task with its own BatchNorm statistics -> (T, B, D)."""
    tasks, batch = x.shape[:2]
    h = x
    convs = [s for s in plan.steps if s.kind == "conv"]
    if convs and all(params[s.prefix + "conv.weight"].dim() == 4 for s in convs):
        h = x.transpose(0, 1).reshape(batch * tasks, *x.shape[2:])  # (B*T, C, H, W): image b*T + t
        for step in convs:
            h = _shared_conv_block(h, params, step, tasks)
        h = h.mean(dim=(2, 3)) if plan.steps[-1].kind == "spatial_mean" else h.flatten(1)  # (B*T, D)
        return h.view(batch, tasks, -1).transpose(0, 1)  # (T, B, D)
    if convs:
        # (T, B, C, H, W) -> (B, T*C, H, W): task t owns channels [t*C, (t+1)*C)
        h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
    for step in plan.steps:
        p = step.prefix
        if step.kind == "conv":
            h = _conv(h, params[p + "conv.weight"], params[p + "conv.bias"], tasks, step.stride)
            h = F.relu(_batch_norm(h, params[p + "norm.weight"], params[p + "norm.bias"], tasks, step.eps))
            if step.pool:
                h = F.max_pool2d(h, 2)
        elif step.kind == "linear":
            h = _linear(h, params[p + "0.weight"], params[p + "0.bias"])  # (T, B, F)
            features = h.shape[2]
            h = h.transpose(0, 1).reshape(batch, tasks * features)  # (B, T*F) for per-task statistics
            h = _batch_norm(h, params[p + "1.weight"], params[p + "1.bias"], tasks, step.eps)
            h = F.relu(h).view(batch, tasks, features).transpose(0, 1)  # (T, B, F)
        elif step.kind == "flatten_input":
            h = h.reshape(tasks, batch, -1)  # (T, B, C*H*W)
        elif step.kind == "spatial_mean":
            h = h.mean(dim=(2, 3)).view(batch, tasks, -1).transpose(0, 1)  # (B, T*C) -> (T, B, C)
        else:  # "flatten": (B, T*C, h, w) -> (T, B, C*h*w) in the (C, h, w) order of nn.Flatten
            h = h.reshape(batch, tasks, -1).transpose(0, 1)
    return h


def task_batched_forward(plan: BatchedPlan, params: Params, x: Tensor) -> Tensor:
    """Logits (T, B, ways) of every task: task t run on ``x[t]`` with its own (or the shared) parameters.

    Args:
        plan: ``plan_for(model)``.
        params: every parameter name of the model, each with its module shape (shared by all tasks)
            or with a leading dimension T (one per task).
        x: (T, B, C, H, W) images (B the same for every task).

    Returns:
        (T, B, ways) logits.
    """
    return task_batched_head(params, task_batched_body(plan, params, x))
