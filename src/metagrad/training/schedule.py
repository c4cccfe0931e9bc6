"""What changes from iteration to iteration: the outer learning rate, MAML++'s epochs, multi-step loss
weights and first-order epochs.

Each function maps ``(meta, iteration)`` to that iteration's setting; the loop (:mod:`metagrad.training.loop`)
asks them once per step.
"""

from __future__ import annotations

import dataclasses
import math

from metagrad.training.config import MetaConfig

__all__ = ["epoch_of", "iteration_settings", "learning_rate", "multi_step_loss_weights"]


def epoch_of(meta: MetaConfig, iteration: int) -> int:
    """The 0-based epoch of step ``iteration`` (1-based) when ``meta.iterations_per_epoch`` sets epochs,
    counted as MAML++'s code counts them (``experiment_builder.py``: completed iterations // iterations per
    epoch); 0 without epochs."""
    return (iteration - 1) // meta.iterations_per_epoch if meta.iterations_per_epoch else 0


def learning_rate(meta: MetaConfig, iteration: int) -> float:
    """The outer learning rate used by step ``iteration`` (1-based): constant, cosine- or linearly annealed.

    The linear schedule goes from ``meta_lr`` at the first step towards ``min_meta_lr`` at the last, as
    Reptile's code anneals its meta step size (``frac_done = i / meta_iters``).

    The cosine schedule starts at ``meta_lr`` and decays towards ``min_meta_lr`` over ``iterations``
    steps, step by step; with epochs (``iterations_per_epoch``) it moves once per epoch, as MAML++'s code
    steps torch's ``CosineAnnealingLR(T_max=total_epochs, eta_min=min_learning_rate)`` with the epoch
    (``few_shot_learning_system.py``, ``run_train_iter``).
    """
    if meta.lr_schedule == "cosine":
        if meta.iterations_per_epoch:
            progress = epoch_of(meta, iteration) / (meta.iterations / meta.iterations_per_epoch)
        else:
            progress = (iteration - 1) / meta.iterations
        progress = min(progress, 1.0)  # past the planned iterations (a resumed, extended run): the floor
        floor = meta.min_meta_lr
        return floor + (meta.meta_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if meta.lr_schedule == "linear":
        done = min((iteration - 1) / meta.iterations, 1.0)
        return done * meta.min_meta_lr + (1.0 - done) * meta.meta_lr
    return meta.meta_lr


def multi_step_loss_weights(meta: MetaConfig, iteration: int) -> list[float] | None:
    """MAML++'s multi-step loss weights for step ``iteration``, one per inner step; None once the
    ``msl_epochs`` are over (or without MSL): the last step's query loss alone.

    The schedule of the reference code (``few_shot_learning_system.py``,
    ``get_per_step_loss_importance_vector``): every step starts at ``1/n``; each epoch the first
    ``n - 1`` weights lose ``1/(n * msl_epochs)`` down to a floor of ``0.03/n`` while the last one gains
    what they lose, up to ``1 - (n - 1) * 0.03/n``, so the last step comes to dominate.
    """
    if not meta.msl_epochs or epoch_of(meta, iteration) >= meta.msl_epochs:
        return None
    n, epoch = meta.inner_steps, epoch_of(meta, iteration)
    decay, floor = 1.0 / n / meta.msl_epochs, 0.03 / n
    earlier = [max(1.0 / n - epoch * decay, floor)] * (n - 1)
    return [*earlier, min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)]


def iteration_settings(meta: MetaConfig, iteration: int) -> MetaConfig:
    """``meta`` as step ``iteration`` uses it: first order during MAML++'s DA epochs
    (``first_order_epochs``), the configured order after. MAML++'s code trains second order when
    ``epoch > first_order_to_second_order_epoch``; ``first_order_epochs`` is that setting plus one."""
    if meta.first_order_epochs and epoch_of(meta, iteration) < meta.first_order_epochs:
        return dataclasses.replace(meta, first_order=True)
    return meta
