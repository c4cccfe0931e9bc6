"""Learned inner rates in a run (``meta.learned_inner_lr``): Meta-SGD's per element, MAML++'s LSLR per
tensor and step.

:func:`inner_rates` makes them, :func:`inner_learning_rate` turns them into the ``inner_lr`` the algorithms
take, :func:`meta_parameters` puts them beside the parameters the outer loop optimizes, and
:func:`restore_rates` / :func:`saved_rates` carry them through checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad import algorithms, per_step
from metagrad.data.episodes import task_generator
from metagrad.errors import TrainingError
from metagrad.functional import learned_rates
from metagrad.training.config import MetaConfig
from metagrad.types import LearningRate, Params

__all__ = ["inner_learning_rate", "inner_rates", "meta_parameters", "restore_rates", "saved_rates"]


def inner_rates(meta: MetaConfig, params: Params, seed: int) -> Params:
    """The learned inner rates ``meta.learned_inner_lr`` asks for, as leaves that require grad, named as
    ``functional.learned_rates`` names them; empty for "none" (the inner loop uses ``meta.inner_lr``).

    "per-parameter" (Meta-SGD): a tensor of each parameter's shape, starting at ``meta.inner_lr`` or
    uniform in ``[meta.inner_lr_init_low, meta.inner_lr)``, drawn from a generator of its own (seeded
    like the task streams), so that the model's initialization and the tasks do not change.
    "per-layer-per-step" (MAML++'s LSLR): a scalar per parameter tensor and inner step
    (``"<step>.<name>"``), each starting at ``meta.inner_lr``.
    ``inner_learning_rate`` turns them into the ``inner_lr`` the algorithms take.
    """
    params = per_step.shared(params)  # the adapted ones: MAML++'s per-step BatchNorm copies have no rate
    if meta.learned_inner_lr == "per-parameter":
        return algorithms.meta_sgd_rates(params, inner_lr=meta.inner_lr, low=meta.inner_lr_init_low,
                                         generator=task_generator(seed, "inner_lr"))
    if meta.learned_inner_lr == "per-layer-per-step":
        return learned_rates(algorithms.lslr_rates(params, inner_lr=meta.inner_lr, steps=meta.inner_steps))
    return {}


def inner_learning_rate(meta: MetaConfig, rates: Params, steps: int) -> LearningRate:
    """The ``inner_lr`` of an inner loop of ``steps`` steps: ``meta.inner_lr`` without learned rates,
    Meta-SGD's ``rates`` (the same for every step), or LSLR's per-step dicts. LSLR has rates for the
    ``meta.inner_steps`` steps of meta-training; test-time steps beyond them take the last step's rates.
    """
    if meta.learned_inner_lr == "per-layer-per-step":
        per_step: list[dict[str, Tensor]] = [{} for _ in range(meta.inner_steps)]
        for where, rate in rates.items():
            step, name = where.split(".", 1)
            per_step[int(step)][name] = rate
        return [per_step[min(step, meta.inner_steps - 1)] for step in range(steps)]
    return rates or meta.inner_lr


def meta_parameters(params: Params, rates: Params) -> Params:
    """Everything the outer loop optimizes: the model's parameters, then the learned rates
    (``inner_lr.<name>``), in the order of ``compute_meta_gradients``' flat gradient."""
    return {**params, **algorithms.meta_rates(rates)}


def restore_rates(rates: Params, checkpoint: dict[str, Any], path: Path) -> None:
    """Copy a checkpoint's learned inner rates (``"inner_lrs"``) into ``rates``.

    Raises:
        TrainingError: the checkpoint lacks rates ``rates`` has, has others, or of other shapes.
    """
    saved = checkpoint.get("inner_lrs", {})
    if not isinstance(saved, dict) or set(saved) != set(rates) or any(
            not isinstance(t, Tensor) or t.shape != rates[k].shape for k, t in saved.items()):
        raise TrainingError(f"{path} does not hold the learned inner rates that meta.learned_inner_lr asks "
                            "for: it comes from a run with other settings; restore that run's config.json")
    with torch.no_grad():
        for name, tensor in saved.items():
            rates[name].copy_(tensor)


def saved_rates(rates: Params) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in rates.items()}
