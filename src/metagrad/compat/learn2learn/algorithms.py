"""``l2l.algorithms.MAML`` and ``MetaSGD``: learn2learn's ``clone()`` / ``adapt()`` wrappers.

As in learn2learn, ``clone()`` wraps :func:`~metagrad.compat.learn2learn.utils.clone_module` of the
module: a module whose parameters are fast weights, non-leaf tensors whose graph goes back to the
original parameters. ``adapt(loss)`` replaces each fast weight ``p`` by ``p - lr * grad`` (Meta-SGD:
``p - lrs[p] * grad``) with metagrad's :func:`~metagrad.functional.sgd_step`, taking the gradient with
``create_graph=not first_order``. So ``learner.parameters()``, ``learner.module.named_parameters()``
and ``learner.module.features`` all see the adapted weights, and a loss on the learner
back-propagates into the original module's ``.grad``.

Attributes the wrapper lacks are looked up on the wrapped module (``learner.features``), as learn2learn's
``BaseLearner`` does: the one place metagrad forwards with ``__getattr__``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.compat.learn2learn._missing import missing_names
from metagrad.compat.learn2learn.utils import clone_module, clone_parameters, set_parameters
from metagrad.functional import sgd_step

__all__ = ["MAML", "MetaSGD", "maml_update"]


class _Learner(nn.Module):
    """Runs the wrapped ``module`` and looks attributes up on it (learn2learn's BaseLearner)."""

    module: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Through __dict__: before __init__ has run (unpickling), _modules itself is missing.
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:
                raise
            return getattr(module, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (with this learner's fast weights, for a clone)."""
        return self.module(*args, **kwargs)


def _gradients(loss: Tensor, params: dict[str, Tensor], *, first_order: bool, allow_unused: bool,
               allow_nograd: bool) -> dict[str, Tensor]:
    """name -> d loss / d param for the parameters the update changes (frozen or unused ones left out)."""
    # allow_nograd: parameters with requires_grad=False are not differentiated (and stay as they are);
    # otherwise torch.autograd.grad raises on them, as in learn2learn.
    names = [k for k, p in params.items() if p.requires_grad or not allow_nograd]
    try:
        # create_graph keeps the gradient differentiable, so a loss after adapt() sees d(grad)/d(params):
        # that is MAML's second-order term. First order treats the gradient as a constant.
        grads = torch.autograd.grad(loss, [params[k] for k in names], retain_graph=not first_order,
                                    create_graph=not first_order, allow_unused=allow_unused)
    except RuntimeError as err:
        raise RuntimeError(f"{err}\nadapt(): if some parameters are frozen (requires_grad=False) or unused "
                           "by the loss, pass allow_nograd=True and/or allow_unused=True") from err
    return {k: g for k, g in zip(names, grads) if g is not None}


def maml_update(model: nn.Module, lr: float, grads: Sequence[Tensor | None] | None = None) -> nn.Module:
    """Replace each parameter ``p`` of ``model`` (usually a clone) by ``p - lr * g``, in place (what ``adapt``
    does after taking the gradient).

    Args:
        model: the module to update.
        lr: the step size.
        grads: one gradient (or None: unchanged) per ``model.parameters()``; None uses each parameter's
            ``.grad``.

    Returns:
        ``model``.

    Raises:
        ValueError: ``grads`` has a different length than ``model.parameters()``.

    Example:
        >>> learner = l2l.clone_module(model)
        >>> grads = torch.autograd.grad(loss, learner.parameters(), create_graph=True)
        >>> l2l.algorithms.maml_update(learner, lr=0.1, grads=grads)
    """
    params = dict(model.named_parameters())
    grads = [p.grad for p in params.values()] if grads is None else list(grads)
    if len(grads) != len(params):
        raise ValueError(f"maml_update: {len(grads)} gradients for {len(params)} parameters; pass one per "
                         "model.parameters() (None leaves one unchanged)")
    step = {k: g for k, g in zip(params, grads) if g is not None}
    set_parameters(model, sgd_step(params, step, lr=lr))
    return model


class MAML(_Learner):
    """Wrap a model for MAML: ``learner = maml.clone(); learner.adapt(loss(learner(x), y))``.

    Args:
        model: the module whose parameters are meta-learned (``maml.parameters()`` are its parameters).
        lr: inner (fast adaptation) learning rate.
        first_order: treat the inner gradients as constants (first-order MAML).
        allow_unused: let ``adapt`` skip parameters the loss does not use; defaults to ``allow_nograd``.
        allow_nograd: let ``adapt`` skip parameters with ``requires_grad=False``.

    Example:
        >>> maml = MAML(model, lr=0.4)
        >>> learner = maml.clone()
        >>> learner.adapt(F.cross_entropy(learner(support_x), support_y))
        >>> F.cross_entropy(learner(query_x), query_y).backward()  # meta-gradient in model's .grad

    References:
        Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML;
        Arnold et al. 2020, "learn2learn: A Library for Meta-Learning Research" (the API reproduced here).
    """

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False) -> None:
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> MAML:
        """A learner whose parameters start as this one's (clones in the graph); options default to its."""
        return MAML(
            clone_module(self.module), self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One gradient step on ``loss``: each parameter ``p`` becomes ``p - lr * dloss/dp``.

        Args:
            loss: scalar computed with this learner's parameters.
            first_order: defaults to the learner's.
            allow_unused: defaults to the learner's; unused parameters are then left unchanged.
            allow_nograd: defaults to the learner's; parameters without ``requires_grad`` are then
                left unchanged instead of raising.

        Raises:
            RuntimeError: a parameter is unused or frozen and that is not allowed (the message says which
                flag to pass).
        """
        params = dict(self.module.named_parameters())
        grads = _gradients(
            loss, params,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )
        set_parameters(self.module, sgd_step(params, grads, lr=self.lr))


class MetaSGD(_Learner):
    """Meta-SGD: MAML with a learning rate per parameter element, meta-learned with the initialization.

    ``metasgd.parameters()`` are the model's parameters followed by ``lrs``. A clone carries clones of
    ``lrs`` (in the graph, like its fast weights), so the query loss back-propagates into both. As in
    learn2learn, first order drops only d(grad)/d(params): the learning rates still get gradients.

    Args:
        model: the module whose parameters are meta-learned.
        lr: initial value of every learning rate (``lrs`` start as ``lr * ones_like(p)``).
        first_order: treat the inner gradients as constants.
        lrs: the learning rates, one tensor per ``model.parameters()``; None creates them from ``lr``.

    Example:
        >>> meta = MetaSGD(model, lr=0.1)
        >>> learner = meta.clone()
        >>> learner.adapt(F.cross_entropy(learner(support_x), support_y))
        >>> F.cross_entropy(learner(query_x), query_y).backward()  # grads in model and meta.lrs

    References:
        Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv:1707.09835.
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False,
                 lrs: Iterable[Tensor] | None = None) -> None:
        super().__init__()
        self.module = model
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        self.lrs = lrs
        self.first_order = first_order

    def clone(self) -> MetaSGD:
        """A learner whose parameters and learning rates start as this one's (clones in the graph)."""
        return MetaSGD(clone_module(self.module), lrs=clone_parameters(self.lrs),
                       first_order=self.first_order)

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """One step on ``loss``: each parameter ``p`` becomes ``p - lrs[p] * dloss/dp`` (elementwise).

        Raises:
            ValueError: ``lrs`` does not hold one tensor per parameter.
            RuntimeError: a parameter is unused by ``loss`` or frozen (learn2learn's MetaSGD has no
                ``allow_unused``/``allow_nograd``).
        """
        params = dict(self.module.named_parameters())
        lrs = list(self.lrs)
        if len(lrs) != len(params):
            raise ValueError(f"MetaSGD has {len(lrs)} learning rates for {len(params)} parameters; "
                             "pass lrs with one tensor per model.parameters(), or lrs=None")
        grads = _gradients(loss, params, first_order=self.first_order if first_order is None else first_order,
                           allow_unused=False, allow_nograd=False)
        set_parameters(self.module, sgd_step(params, grads, lr=dict(zip(params, lrs))))


_NOT_PROVIDED = {
    "meta_sgd_update": "use MetaSGD(model).clone().adapt(loss), or clone_module + update_module",
    "GBML": "use MAML or MetaSGD; learnable update rules (l2l.optim) are not provided",
    "MetaCurvature": "not implemented in metagrad; use MAML or MetaSGD",
    "LightningEpisodicModule": "PyTorch Lightning stays out of metagrad: write the loop with MAML, or run "
                               "`metagrad train`",
    "LightningMAML": "PyTorch Lightning stays out of metagrad: write the loop with MAML, or run "
                     "`metagrad train`",
    "LightningANIL": "PyTorch Lightning stays out of metagrad: wrap only the head in MAML (ANIL), or run "
                     "`metagrad train --algorithm anil`",
    "LightningPrototypicalNetworks": "metagrad implements gradient-based meta-learning only",
    "LightningMetaOptNet": "metagrad implements gradient-based meta-learning only",
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
