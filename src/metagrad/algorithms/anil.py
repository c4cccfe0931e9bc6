"""ANIL: MAML whose inner loop adapts only the head.

The body (``model.features``) keeps the meta-learned weights inside a task, so its output on the
support set and on the query set is computed once (``Algorithm.adapt_and_score``); the inner loop runs
on the linear head (``model.classifier``) alone. The body still receives meta-gradients through the
query loss. BatchNorm in the body normalizes the support set and the query set each with its own
statistics, as MAML's separate support and query forwards do.

References:
    Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse? Towards Understanding the
    Effectiveness of MAML", ICLR.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from metagrad.algorithms.base import Algorithm, body_and_head_names

__all__ = ["ANIL"]


@dataclass(frozen=True, eq=False)
class ANIL(Algorithm):
    """Almost no inner loop: only ``classifier.*`` adapts; needs ``.features`` and ``.classifier``."""

    name = "anil"

    def adapted(self, model: nn.Module, names: list[str]) -> list[str]:
        return body_and_head_names(model, names)[1]


ALGORITHM = ANIL
"""What ``algorithms/registry.py`` registers of this file."""
