"""``l2l.nn``: learn2learn's small utility modules, ``Lambda`` and ``Flatten``.

The rest of learn2learn's ``l2l.nn`` (Kronecker layers, ``Scale``, the prototypical and MetaOptNet heads,
``MetaModule``) is not provided; looking one up raises an ``AttributeError`` that says what to use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from metagrad.compat.learn2learn._missing import missing_names

__all__ = ["Flatten", "Lambda"]


class Lambda(nn.Module):
    """A module whose forward is ``lmb(*args, **kwargs)``, e.g. ``Lambda(lambda x: x.mean(dim=[2, 3]))``."""

    def __init__(self, lmb: Callable[..., Any]) -> None:
        super().__init__()
        self.lmb = lmb

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """(B, ...) -> (B, -1), as a view (learn2learn's: a non-contiguous input raises, as ``Tensor.view``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


_NOT_PROVIDED = {
    "Scale": "multiply by an nn.Parameter of your own in the module's forward",
    "freeze": "set requires_grad=False on the module's parameters (metagrad neither adapts nor meta-learns "
              "frozen parameters)",
    "unfreeze": "set requires_grad=True on the module's parameters",
    "KroneckerLinear": "no Kronecker-factored layers; use torch.nn.Linear",
    "KroneckerRNN": "no Kronecker-factored layers; use torch.nn.RNN",
    "KroneckerLSTM": "no Kronecker-factored layers; use torch.nn.LSTM",
    "PrototypicalClassifier": "metagrad implements gradient-based meta-learning only (no prototypical "
                              "networks)",
    "SVClassifier": "metagrad implements gradient-based meta-learning only (no MetaOptNet)",
    "MetaModule": "learnable update transforms (l2l.optim) are not provided",
    "ParameterTransform": "learnable update transforms (l2l.optim) are not provided",
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
