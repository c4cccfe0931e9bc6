"""Check a model before training on it: which path it takes, and whether that path is exact for it.

``check_model`` copies the model to float64, draws a small random meta-batch, and compares the
meta-gradient (and the running statistics the step leaves) of the path ``vectorize=True`` picks with
the per-task loop's (plain autograd, one task at a time), first and second order. Finite differences
are no check for a user's ReLU network here: the inner gradient jumps where a unit crosses zero, so
MAML's meta-loss is discontinuous and a big network crosses some kink at any step size.

Dropout is off on both paths during the comparison: each path draws its own masks (vmap one per task,
the loop task after task) and is exact for the masks it draws, so with dropout on they would differ
without either being wrong. The report says whether the model uses dropout. A forward that draws other
random numbers (``torch.rand``, ``torch.bernoulli``) cannot be compared at all; the check finds it by
running the loop twice from different random states, and says so instead of giving a verdict.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from metagrad.algorithms.meta_batch import meta_batch_loss
from metagrad.algorithms.registry import make
from metagrad.algorithms.strategies import strategy_for
from metagrad.types import Episode, LossFn, Params

__all__ = ["ModelCheck", "check_model"]

TOLERANCE = 1e-6
"""Largest relative error (float64) that counts as exact; rounding alone stays near 1e-12."""


@dataclass(frozen=True)
class ModelCheck:
    """What ``check_model`` found.

    Attributes:
        model: the model's class name.
        strategy: the path ``vectorize=True`` takes ("batched", "vmap" or "loop").
        second_order_error: largest relative difference of the second-order meta-gradient and running
            statistics from the per-task loop's (0.0 when the strategy is the loop itself).
        first_order_error: the same, first order.
        tolerance: the threshold the errors are held to.
    """

    model: str
    strategy: str
    second_order_error: float
    first_order_error: float
    tolerance: float = TOLERANCE
    dropout: tuple[str, ...] = ()
    random_error: float = 0.0

    @property
    def comparable(self) -> bool:
        """False when the forward draws random numbers besides dropout: then no verdict can be given."""
        return self.random_error <= self.tolerance

    @property
    def ok(self) -> bool:
        return self.comparable and max(self.second_order_error, self.first_order_error) <= self.tolerance

    def __str__(self) -> str:
        if not self.comparable:
            return (f"{self.model}: {self.strategy} path; cannot compare: its forward draws random numbers "
                    f"besides dropout (two runs of the per-task loop differ by {self.random_error:.1e}), and "
                    "each path is exact only for the numbers it draws (docs/EXACTNESS.md, Randomness). "
                    "Draw them through torch's dropout (nn.Dropout, F.dropout), which the check turns off, "
                    "or check the model with them off")
        verdict = "exact" if self.ok else "NOT exact: train it with vectorize=False and report the model"
        noted = ""
        if self.dropout:
            noted = (f"; dropout ({', '.join(self.dropout)}) turned off on both paths for the comparison: in "
                     "training each path draws its own masks and is exact for them (docs/EXACTNESS.md)")
        return (f"{self.model}: {self.strategy} path; largest relative error against the per-task loop "
                f"{self.second_order_error:.1e} (second order), {self.first_order_error:.1e} (first order): "
                f"{verdict}{noted}")


_DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                       F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                       torch.feature_alpha_dropout})


_DROPOUT_P = {F.scaled_dot_product_attention: 4, F.multi_head_attention_forward: 10}
"""Functions that take a ``dropout_p`` (attention dropout, nn.MultiheadAttention's and the Transformer
layers'), and its position."""


class _NoDropout(TorchFunctionMode):
    """Every dropout function (so every dropout module) returns its input, and attention runs with
    ``dropout_p=0``; records those that would have drawn a mask (training on, p > 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUT_P:
            at = _DROPOUT_P[func]
            p = args[at] if len(args) > at else kwargs.get("dropout_p", 0.0)
            if p > 0 and kwargs.get("training", True):
                self.seen.add(func.__name__)
            if len(args) > at:
                args = (*args[:at], 0.0, *args[at + 1:])
            else:
                kwargs["dropout_p"] = 0.0
            # the math kernel, which attention with dropout runs on too: the fused CPU kernels that
            # dropout_p=0 would pick have no second derivative
            with sdpa_kernel(SDPBackend.MATH):
                return func(*args, **kwargs)
        if func not in _DROPOUTS:
            return func(*args, **kwargs)
        names = ("input", "p", "training") if func.__module__ == F.__name__ else ("input", "p", "train")
        bound = dict(zip(names, args)) | kwargs
        if bound.get(names[2], True) and bound.get("p", 0.5) > 0:
            self.seen.add(func.__name__)
        return bound["input"]


def _dropout_modules(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0})


def _random_episode(input_shape: tuple[int, ...], target_shape: tuple[int, ...] | None, *, tasks: int,
                    ways: int, shots: int, query_shots: int, generator: torch.Generator) -> Episode:
    def part(per_class: int) -> tuple[Tensor, Tensor]:
        n = ways * per_class
        x = torch.randn(tasks, n, *input_shape, generator=generator, dtype=torch.float64)
        if target_shape is not None:  # regression: float targets
            return x, torch.randn(tasks, n, *target_shape, generator=generator, dtype=torch.float64)
        labels = torch.arange(ways).repeat_interleave(per_class)  # (N*K,), classes consecutive
        return x, labels.expand(tasks, n).clone()

    return Episode(*part(shots), *part(query_shots))


def _flat(model: nn.Module, grads: dict[str, Tensor]) -> Tensor:
    parts = [grads[k].reshape(-1) for k in sorted(grads)]
    parts += [b.double().reshape(-1) for _, b in sorted(model.named_buffers())]  # running statistics too
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _meta_gradient(model: nn.Module, algorithm: str, episode: Episode, *, vectorize: bool, first_order: bool,
                   inner_lr: float, inner_steps: int, loss_fn: LossFn | None) -> tuple[Tensor, Tensor]:
    """(meta-loss, flat meta-gradient then buffers) of a copy of ``model``, which the step may change."""
    model = copy.deepcopy(model)
    params: Params = dict(model.named_parameters())
    algo = make(algorithm, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                loss_fn=loss_fn)
    out = meta_batch_loss(algo, model, params, dict(model.named_buffers()), episode, vectorize=vectorize)
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    grads = torch.autograd.grad(out.loss, list(trainable.values()), allow_unused=True)
    named = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(trainable.items(), grads)}
    return out.loss.detach(), _flat(model, named)


def _relative(a: Tensor, b: Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-30) if a.numel() else 0.0


def check_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    algorithm: str = "maml",
    ways: int = 5,
    shots: int = 2,
    query_shots: int = 2,
    tasks: int = 3,
    inner_lr: float = 0.1,
    inner_steps: int = 2,
    loss_fn: LossFn | None = None,
    target_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> ModelCheck:
    """Compare the meta-gradients metagrad computes for ``model`` with the per-task float64 reference.

    The model is copied (the original is not changed) and run in float64 on a random meta-batch.

    Args:
        model: any ``nn.Module`` taking (B, *input_shape) inputs.
        input_shape: one sample's shape, e.g. (1, 28, 28).
        algorithm: a name in ``algorithms.ALGORITHMS`` (ANIL and BOIL need ``.features`` and ``.classifier``).
        ways, shots, query_shots, tasks: the random meta-batch's shape; class labels in [0, ways).
        inner_lr, inner_steps: the inner loop.
        loss_fn: per-task loss (None: cross-entropy on class labels).
        target_shape: one sample's target shape for a regression ``loss_fn`` (float targets); None for
            class labels.
        seed: of the random meta-batch.

    Returns:
        A ``ModelCheck``; ``print`` it for one line, ``.ok`` for the verdict.

    Example:
        >>> print(check_model(MyNet(), (3, 84, 84)))
    """
    model = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(seed)
    episode = _random_episode(input_shape, target_shape, tasks=tasks, ways=ways, shots=shots,
                              query_shots=query_shots, generator=generator)
    strategy = strategy_for(make(algorithm, inner_lr=inner_lr, inner_steps=inner_steps), model,
                            dict(model.named_parameters()), dict(model.named_buffers()), episode=episode)
    common: dict[str, Any] = {"inner_lr": inner_lr, "inner_steps": inner_steps, "loss_fn": loss_fn}
    errors, loops = [], []
    with torch.random.fork_rng(devices=[]), _NoDropout() as no_dropout:  # the caller's random state is kept
        for first_order in (False, True):
            torch.manual_seed(seed)
            _, fast = _meta_gradient(model, algorithm, episode, vectorize=True, first_order=first_order,
                                     **common)
            _, loop = _meta_gradient(model, algorithm, episode, vectorize=False, first_order=first_order,
                                     **common)
            errors.append(_relative(fast, loop))
            loops.append(loop)
        torch.manual_seed(seed + 1)  # the loop again from other random states: equal unless it draws
        _, again = _meta_gradient(model, algorithm, episode, vectorize=False, first_order=False, **common)
    attention = {f.__name__ for f in _DROPOUT_P} & no_dropout.seen
    functions = sorted(f"F.{name}" for name in no_dropout.seen - attention)
    dropout = (_dropout_modules(model) or functions) + sorted(f"F.{name}" for name in attention)
    return ModelCheck(type(model).__name__, strategy, errors[0], errors[1], dropout=tuple(dropout),
                      random_error=_relative(again, loops[0]))
