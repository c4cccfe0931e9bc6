"""``l2l.algorithms.MAML``: learn2learn's ``clone()`` / ``adapt()`` wrapper on metagrad's functional core.

Unlike learn2learn, a clone does not copy the module: it holds its fast weights in a dict (``.params``)
and runs the shared ``.module`` with them through ``torch.func.functional_call``. The gradients are
those of learn2learn: ``clone()`` keeps the graph back to the original parameters and ``adapt(loss)``
replaces each parameter ``p`` by ``p - lr * grad`` with ``create_graph=not first_order``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagrad.functional import sgd_step
from metagrad.types import Params

__all__ = ["MAML"]


class MAML(nn.Module):
    """Wrap a model for MAML: ``learner = maml.clone(); learner.adapt(loss(learner(x), y))``.

    Args:
        model: the module whose parameters are meta-learned (``maml.parameters()`` are its parameters).
        lr: inner (fast adaptation) learning rate.
        first_order: detach the inner gradients (first-order MAML).
        allow_unused: let ``adapt`` skip parameters the loss does not use; defaults to ``allow_nograd``.
        allow_nograd: let ``adapt`` skip parameters with ``requires_grad=False``.

    Calling a ``MAML`` runs the model with its current (fast) weights. ``.module`` is the wrapped model
    itself, shared by every clone: ``learner.module(x)`` and ``learner.module.features(x)`` run the
    *original* weights; call the learner itself to use the adapted ones.

    Example:
        >>> maml = MAML(model, lr=0.4)
        >>> learner = maml.clone()
        >>> learner.adapt(F.cross_entropy(learner(support_x), support_y))
        >>> F.cross_entropy(learner(query_x), query_y).backward()  # meta-gradient in model's .grad

    References:
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
        self.params: Params | None = None  # fast weights; None = the module's own parameters

    def _current(self) -> Params:
        return dict(self.module.named_parameters()) if self.params is None else self.params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model with this learner's current weights."""
        if self.params is None:
            return self.module(*args, **kwargs)
        return torch.func.functional_call(self.module, self.params, args, kwargs)

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> MAML:
        """A learner starting from this one's weights; gradients flow back through it to them."""
        learner = MAML(
            self.module, self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )
        # The same tensors, not copies: learn2learn's clone() is an identity in the autograd graph too.
        learner.params = dict(self._current())
        return learner

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One gradient step on ``loss``: each weight ``p`` becomes ``p - lr * dloss/dp``.

        Args:
            loss: scalar computed with this learner's current weights.
            first_order: defaults to the learner's; second order keeps the gradient's graph
                (``create_graph=True``) so the meta-gradient includes it.
            allow_unused: defaults to the learner's; unused parameters are then left unchanged.
            allow_nograd: defaults to the learner's; parameters without ``requires_grad`` are then
                left unchanged instead of raising.
        """
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        params = self._current()
        names = [k for k, p in params.items() if p.requires_grad or not allow_nograd]
        try:
            grads = torch.autograd.grad(
                loss, [params[k] for k in names],
                retain_graph=not first_order, create_graph=not first_order, allow_unused=allow_unused,
            )
        except RuntimeError as err:
            raise RuntimeError(f"{err}\nMAML.adapt: for unused or frozen parameters pass allow_unused=True "
                               "and/or allow_nograd=True") from err
        self.params = sgd_step(params, {k: g for k, g in zip(names, grads) if g is not None}, lr=self.lr)
