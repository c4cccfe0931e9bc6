"""An independent MAML written the textbook way, to check metagrad's fast and loop paths against.

The networks are re-implemented with torch's own ops (``F.conv2d``, ``F.batch_norm(training=True)``,
``F.max_pool2d``, ``F.linear``) from the parameter dict, and the inner loop is unrolled by hand with
``torch.autograd.grad(create_graph=True)``, one task at a time. Nothing from ``metagrad.functional``
or ``metagrad.algorithms`` is used. ``F.batch_norm`` is exact here because nothing is vmapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.models import MiniImagenetCNN, OmniglotCNN, OmniglotFC
from metagrad.types import Episode, Params

EPS = 1e-3
Forward = Callable[[Params, Tensor], Tensor]


def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """torch's own BatchNorm with batch statistics and no running statistics."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)


def reference_forward(model: nn.Module) -> Forward:
    """``f(params, x) -> logits`` computing ``model``'s architecture with plain torch functions."""
    if isinstance(model, OmniglotFC):
        def fc(params: Params, x: Tensor) -> Tensor:
            h = x.flatten(1)
            i = 1
            while f"features.{i}.0.weight" in params:
                h = F.linear(h, params[f"features.{i}.0.weight"], params[f"features.{i}.0.bias"])
                h = _batch_norm(h, params[f"features.{i}.1.weight"], params[f"features.{i}.1.bias"])
                h = F.relu(h)
                i += 1
            return F.linear(h, params["classifier.weight"], params["classifier.bias"])
        return fc

    assert isinstance(model, (OmniglotCNN, MiniImagenetCNN))
    strided = isinstance(model, OmniglotCNN) and model.features[0].conv.stride == (2, 2)

    def cnn(params: Params, x: Tensor) -> Tensor:
        h = x
        i = 0
        while f"features.{i}.conv.weight" in params:
            h = F.conv2d(h, params[f"features.{i}.conv.weight"], params[f"features.{i}.conv.bias"],
                         stride=2 if strided else 1, padding=1)
            h = _batch_norm(h, params[f"features.{i}.norm.weight"], params[f"features.{i}.norm.bias"])
            h = F.relu(h)
            if not strided:
                h = F.max_pool2d(h, 2)
            i += 1
        h = h.mean(dim=(2, 3)) if isinstance(model, OmniglotCNN) else h.flatten(1)
        return F.linear(h, params["classifier.weight"], params["classifier.bias"])
    return cnn


def reference_task_loss(forward: Forward, params: Params, task: Sequence[Tensor], *, inner_lr: float,
                        inner_steps: int, first_order: bool, keys: Sequence[str] | None = None) -> Tensor:
    """Query loss of one task after ``inner_steps`` SGD steps on its support set, unrolled by hand."""
    support_x, support_y, query_x, query_y = task
    names = list(params) if keys is None else list(keys)
    fast = dict(params)
    for _ in range(inner_steps):
        loss = F.cross_entropy(forward(fast, support_x), support_y)
        grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=True)
        if first_order:
            grads = tuple(g.detach() for g in grads)
        fast = {**fast, **{k: fast[k] - inner_lr * g for k, g in zip(names, grads)}}
    return F.cross_entropy(forward(fast, query_x), query_y)


def reference_meta_gradient(model: nn.Module, params: Params, episode: Episode, *, inner_lr: float,
                            inner_steps: int, first_order: bool, keys: Sequence[str] | None = None
                            ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Mean query loss over the tasks and its gradient w.r.t. every tensor of ``params`` (in order)."""
    forward = reference_forward(model)
    losses = [
        reference_task_loss(forward, params, episode.task(i), inner_lr=inner_lr, inner_steps=inner_steps,
                            first_order=first_order, keys=keys)
        for i in range(episode.num_tasks)
    ]
    loss = torch.stack(losses).mean()
    return loss.detach(), torch.autograd.grad(loss, list(params.values()))


def random_episode(tasks: int, ways: int, shots: int, query_shots: int, image_shape: Sequence[int], *,
                   seed: int = 0, dtype: torch.dtype = torch.float64) -> Episode:
    """Random images and class-consecutive labels: support_x (T, N*K, C, H, W) etc."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)  # (T, N*K)
    query_y = torch.arange(ways).repeat_interleave(query_shots).repeat(tasks, 1)  # (T, N*Q)
    return Episode(
        torch.rand(tasks, ways * shots, *image_shape, generator=g, dtype=dtype),
        support_y,
        torch.rand(tasks, ways * query_shots, *image_shape, generator=g, dtype=dtype),
        query_y,
    )
