"""Meta-learned inner learning rates: Meta-SGD's (one per parameter element) and MAML++'s LSLR (one per
parameter tensor and inner step).

Nothing here adapts anything: the rates are passed as ``inner_lr`` to the same functions as MAML's
(``functional.gradient_step`` multiplies each gradient by its rate: element by element for Meta-SGD, a
scalar per tensor for LSLR, ``functional.lr_at`` picking the step's), and ``chunk_gradients`` /
``meta_train_step`` return and apply their meta-gradient beside the parameters'. This module only
creates them.

References:
    Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv:1707.09835.
    Antoniou, Edwards & Storkey 2019, "How to train your MAML", ICLR (Section 4, LSLR).
"""

from __future__ import annotations

import torch

from metagrad.errors import ConfigError
from metagrad.types import Params

__all__ = ["lslr_rates", "meta_sgd_rates"]


def meta_sgd_rates(params: Params, *, inner_lr: float, low: float | None = None,
                   generator: torch.Generator | None = None) -> Params:
    """Learnable inner rates, one tensor of each parameter's shape, dtype and device.

    Args:
        params: name -> tensor, the model's parameters (only their shapes, dtypes and devices are used).
        inner_lr: every rate's start (``low`` None: learn2learn's ``MetaSGD``, ``lr`` times ones), else
            the upper end of the uniform range.
        low: None, or the lower end: each element starts uniform in ``[low, inner_lr)`` (the Meta-SGD
            paper draws its rates at random; the presets cite the range).
        generator: a CPU generator for the uniform draw; None uses torch's global one.

    Returns:
        name -> leaf tensor that requires grad, for each name of ``params``.

    Raises:
        ConfigError: ``low`` is negative or not below ``inner_lr``.
    """
    if low is not None and not 0 <= low < inner_lr:
        raise ConfigError(f"the rates' lower end must be in [0, inner_lr={inner_lr}), got {low}")
    rates = {}
    for name, p in params.items():
        if low is None:
            rate = torch.full(p.shape, inner_lr, dtype=p.dtype)
        else:
            rate = low + (inner_lr - low) * torch.rand(p.shape, generator=generator, dtype=p.dtype)
        rates[name] = rate.to(p.device).requires_grad_()
    return rates


def lslr_rates(params: Params, *, inner_lr: float, steps: int) -> list[Params]:
    """MAML++'s learned per-layer per-step rates: for each inner step, a scalar per parameter tensor.

    Every rate starts at ``inner_lr``, as the reference code's ``LSLRGradientDescentLearningRule.initialise``
    (``inner_loop_optimizers.py``) starts its per-step vector of each parameter at the inner rate.

    Args:
        params: name -> tensor, the model's parameters (their dtypes and devices are used).
        inner_lr: every rate's start.
        steps: inner steps in meta-training (one rate per step).

    Returns:
        ``steps`` dicts name -> 0-dim leaf tensor that requires grad; pass the list as ``inner_lr``.
    """
    return [{name: torch.tensor(inner_lr, dtype=p.dtype, device=p.device, requires_grad=True)
             for name, p in params.items()} for _ in range(steps)]
