"""``l2l.clone_module``, ``l2l.update_module``, ``l2l.detach_module``: modules whose parameters are tensors
in an autograd graph, as learn2learn's MAML needs them.

A clone is a new module tree (each submodule copied, not deep-copied) whose parameters are ``p.clone()``
of the original's: non-leaf tensors, so a loss on the clone back-propagates into the original's ``.grad``.
``update_module`` then swaps a module's parameter tensors for new ones (``p + u``), which keeps that graph.
Parameters shared between submodules stay shared, and RNNs see their new weights.

These write into ``module._parameters`` directly: ``nn.Module.__setattr__`` only accepts ``nn.Parameter``
(leaf) values there, and a fast weight is by design not a leaf. That is learn2learn's contract, kept here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.compat.learn2learn._missing import missing_names
from metagrad.types import Params

__all__ = ["accuracy", "clone_module", "clone_parameters", "detach_module", "magic_box", "set_parameters",
           "update_module"]


def _refresh(module: nn.Module) -> None:
    # An RNN keeps a list of its weight tensors (`_flat_weights`) that forward reads instead of
    # `_parameters`; rebuild it so the RNN runs with the tensors just written.
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def clone_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of ``module`` whose parameters are ``p.clone()`` of its own, differentiable back to them.

    Buffers that require grad are cloned too; other buffers are shared with the original (so BatchNorm
    running statistics are updated in the original's tensors, as in learn2learn). A tensor or submodule
    reached twice is cloned once, so weight tying survives.

    Args:
        module: any ``nn.Module`` (a clone of a clone is fine: the graph goes back to the first).
        memo: internal; maps ``id`` of an original tensor or module to its clone.

    Returns:
        The clone; ``module`` itself is unchanged.

    Example:
        >>> clone = l2l.clone_module(model)
        >>> error = loss(clone(x), y)
        >>> grads = torch.autograd.grad(error, clone.parameters(), create_graph=True)
        >>> l2l.update_module(clone, updates=[-lr * g for g in grads])
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = module._parameters.copy()
    clone._buffers = module._buffers.copy()
    clone._modules = module._modules.copy()
    memo[id(module)] = clone
    for key, param in module._parameters.items():
        if param is not None:
            if id(param) not in memo:
                memo[id(param)] = param.clone()
            clone._parameters[key] = memo[id(param)]
    for key, buffer in module._buffers.items():
        if buffer is not None and buffer.requires_grad:
            if id(buffer) not in memo:
                memo[id(buffer)] = buffer.clone()
            clone._buffers[key] = memo[id(buffer)]
    for key, child in module._modules.items():
        if child is not None:  # an nn.ModuleList may hold None
            clone._modules[key] = clone_module(child, memo)
    _refresh(clone)
    return clone


def set_parameters(module: nn.Module, params: Params) -> None:
    """Swap ``module``'s parameter tensors for ``params`` (keyed by ``named_parameters()`` names), in place.

    Every place a replaced tensor occurs (a tied weight) gets its replacement. Names not in ``params``
    keep their tensor.

    Raises:
        KeyError: a name in ``params`` is not a parameter of ``module``.
    """
    current = dict(module.named_parameters())
    unknown = sorted(set(params) - set(current))
    if unknown:
        raise KeyError(f"{unknown} are not parameters of {type(module).__name__}; "
                       f"its parameters include {sorted(current)[:4]}")
    replacement = {id(current[k]): p for k, p in params.items()}
    for sub in module.modules():
        for key, param in sub._parameters.items():
            if param is not None and id(param) in replacement:
                sub._parameters[key] = replacement[id(param)]
        _refresh(sub)


def update_module(module: nn.Module, updates: Sequence[Tensor | None] | None = None,
                  memo: dict[int, Any] | None = None) -> nn.Module:
    """Replace each parameter ``p`` of ``module`` by ``p + u``, in place and differentiably.

    Args:
        module: usually a clone (updating an original module turns its parameters into non-leaves).
        updates: one tensor (or None: unchanged) per ``module.parameters()``, in that order. None reads
            each parameter's ``.update`` attribute instead, as learn2learn does (parameters without one
            are unchanged); the attributes are then removed.
        memo: accepted for learn2learn's signature; unused (tied weights are handled without it).

    Returns:
        ``module``.

    Raises:
        ValueError: ``updates`` has a different length than ``module.parameters()``.
    """
    named = dict(module.named_parameters())
    if updates is None:
        updates = [getattr(p, "update", None) for p in named.values()]
        for p in named.values():
            if hasattr(p, "update"):
                del p.update
    updates = list(updates)
    if len(updates) != len(named):
        raise ValueError(f"update_module: {len(updates)} updates for {len(named)} parameters; "
                         "pass one per module.parameters() (None leaves one unchanged)")
    set_parameters(module, {k: p + u for (k, p), u in zip(named.items(), updates) if u is not None})
    return module


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Cut ``module``'s parameters (and buffers that require grad) from their graph, in place.

    Args:
        module: the module to detach.
        keep_requires_grad: leave ``requires_grad`` on where it was, so the detached tensors are
            new leaves that collect gradients; otherwise they stop requiring grad.
    """
    for sub in module.modules():
        for tensors in (sub._parameters, sub._buffers):
            for key, tensor in tensors.items():
                if tensor is None or (tensors is sub._buffers and not tensor.requires_grad):
                    continue
                requires_grad = tensor.requires_grad
                tensors[key] = tensor.detach_()
                if keep_requires_grad and requires_grad:
                    tensor.requires_grad_()
        _refresh(sub)


def clone_parameters(param_list: Iterable[Tensor]) -> list[Tensor]:
    """``[p.clone() for p in param_list]``: copies that stay in the graph of the originals."""
    return [p.clone() for p in param_list]


def accuracy(preds: Tensor, targets: Tensor) -> Tensor:
    """The fraction of rows of ``preds`` (B, classes) whose argmax is ``targets`` (B,), as a float32 scalar.

    Targets are compared as integers, so float labels work (learn2learn's ``MiniImagenet`` gives floats).
    """
    hits = (preds.argmax(dim=1).long() == targets.long()).sum().float()
    return hits / preds.size(0)


def magic_box(x: Any) -> Any:
    """DiCE's magic box, ``exp(x - x.detach())``: 1 in value, ``x``'s gradient in the backward; a value
    that is not a tensor is returned as it is.

    References:
        Foerster et al. 2018, "DiCE: The Infinitely Differentiable Monte-Carlo Estimator".
    """
    return torch.exp(x - x.detach()) if isinstance(x, Tensor) else x


_NOT_PROVIDED = {
    "clone_named_parameters": "use {name: p.clone() for name, p in params.items()}",
    "clone_distribution": "torch.distributions are not cloned here; build a new distribution from cloned "
                          "parameters",
    "detach_distribution": "build a new distribution from detached parameters",
    "flatten_config": "metagrad's configs are dataclasses: dataclasses.asdict(config)",
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
