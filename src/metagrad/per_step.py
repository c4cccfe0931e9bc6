"""MAML++'s per-step BatchNorm weights and biases (BNWB), as entries of the params dict.

With BNWB each BatchNorm weight and bias is held once per inner step: ``"<name>@step<k>"`` (k = 0 ..
S-1, S the inner steps of meta-training) replaces ``"<name>"`` in the params dict. Step k's forward on
the support set, and the query forward after step k, use copy k; the inner loop never adapts the
copies, and each receives its own meta-gradient (it is a meta-parameter like any other entry of the
dict, so ``chunk_gradients``, the optimizer and the checkpoints need nothing of their own). Inner
steps beyond S (test-time steps) use the last copy; an inner loop of 0 steps uses copy 0.

Every inner loop (``functional.adapt`` on the loop and vmap strategies, the batched networks' loop in
``algorithms/batched.py``, evaluation) goes through :func:`at_step` and :func:`adapted_keys`, so the
rule is written once here. Without per-step entries both return what they are given.

The name ``"<name>@step<k>"`` cannot be a module's parameter name in practice ("@" does not occur in
attribute names), so a params dict says by itself whether it uses BNWB.

References:
    Antoniou, Edwards & Storkey 2019, "How to train your MAML", ICLR (Section 4, "Per-step batch
    normalization weights and biases"); the reference code keeps a (steps, channels) weight and bias
    in ``MetaBatchNormLayer`` (``meta_neural_network_architectures.py``) and indexes them by the step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from metagrad.errors import ConfigError
from metagrad.types import Params

__all__ = ["SEPARATOR", "adapted_keys", "at_step", "copies_at", "copy_name", "per_step_bn_params",
           "per_step_copies", "shared"]

SEPARATOR = "@step"
"""Between a parameter's name and its step in a per-step copy's name: ``"features.0.norm.weight@step2"``."""

_COPY = re.compile(rf"^(?P<name>.+){re.escape(SEPARATOR)}(?P<step>\d+)$")

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def copy_name(name: str, step: int) -> str:
    """The params-dict name of step ``step``'s copy of parameter ``name``."""
    return f"{name}{SEPARATOR}{step}"


def _split(key: str) -> tuple[str, int] | None:
    match = _COPY.match(key)
    return None if match is None else (match["name"], int(match["step"]))


def per_step_copies(params: Params) -> dict[str, list[str]]:
    """Base name -> the keys of its per-step copies in step order; empty without BNWB."""
    found: dict[str, dict[int, str]] = {}
    for key in params:
        if (split := _split(key)) is not None:
            found.setdefault(split[0], {})[split[1]] = key
    return {name: [steps[k] for k in sorted(steps)] for name, steps in found.items()}


def shared(params: Params) -> Params:
    """``params`` without the per-step copies (what every inner step shares)."""
    return {k: v for k, v in params.items() if _split(k) is None}


def copies_at(params: Params, step: int) -> Params:
    """Copy ``min(step, S - 1)`` of each per-step parameter, under the model's names; empty without BNWB.
    The inner loop lays it over the parameters it adapts before step ``step``'s forward."""
    return {name: params[keys[min(step, len(keys) - 1)]] for name, keys in per_step_copies(params).items()}


def at_step(params: Params, step: int) -> Params:
    """The parameters inner step ``step`` starts from, under the model's names: the shared ones and
    :func:`copies_at`. ``params`` itself when it has no copies."""
    copies = copies_at(params, step)
    return {**shared(params), **copies} if copies else params


def adapted_keys(params: Params, keys: Iterable[str] | None) -> list[str] | None:
    """The names the inner loop adapts: ``keys`` (None: all) less the per-step copies and the names they
    stand for (BNWB's weights and biases are meta-learned, never adapted). None when ``keys`` is None
    and ``params`` has no copies (adapt everything, as before)."""
    copies = per_step_copies(params)
    if keys is None and not copies:
        return None
    names = list(params) if keys is None else list(keys)
    return [k for k in names if k not in copies and _split(k) is None]


def per_step_bn_params(model: nn.Module, params: Params, *, steps: int) -> Params:
    """``params`` with each BatchNorm weight and bias of ``model`` replaced by ``steps`` copies (BNWB).

    Every copy starts as a clone of the parameter (the reference code starts every step's weight at
    1 and bias at 0, i.e. at the same values), as a leaf that requires grad; the order of ``params`` is
    kept, each parameter's copies in its place. A BatchNorm is ``torch.nn``'s (any ``_BatchNorm``) or
    metagrad's ``models.BatchNorm``.

    Args:
        model: the network whose BatchNorm layers are found (by module type).
        params: name -> tensor, as ``dict(model.named_parameters())``.
        steps: inner steps of meta-training S (one copy each).

    Returns:
        A new dict: the other tensors as they were, ``"<name>@step<k>"`` for each copy.

    Raises:
        ConfigError: ``steps`` < 1, or the model has no BatchNorm weight or bias in ``params``.
    """
    from metagrad.models.layers import BatchNorm  # models import functional, which imports this module

    if steps < 1:
        raise ConfigError(f"per-step BatchNorm weights need at least 1 inner step, got {steps}")
    norm_names = {f"{prefix}.{leaf}" if prefix else leaf
                  for prefix, module in model.named_modules() if isinstance(module, (*_NORMS, BatchNorm))
                  for leaf, _ in module.named_parameters(recurse=False)}
    found = [k for k in params if k in norm_names]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no BatchNorm weight or bias among the parameters "
                          "given, so per-step BatchNorm weights (meta.per_step_bn) have nothing to copy; "
                          "set meta.per_step_bn = false")
    out: Params = {}
    for name, tensor in params.items():
        if name not in norm_names:
            out[name] = tensor
            continue
        for step in range(steps):
            with torch.no_grad():
                out[copy_name(name, step)] = tensor.detach().clone().requires_grad_(tensor.requires_grad)
    return out
