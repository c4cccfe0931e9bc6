"""MAML (and first-order MAML): adapt every parameter on the support set, score the query set.

MAML is :class:`~metagrad.algorithms.base.Algorithm` itself: every parameter adapted by SGD, the
meta-gradient back-propagated through the inner loop. First-order MAML is ``MAML(first_order=True)``
(the inner gradients detached); configs that name the algorithm "fomaml" load as that.

References:
    Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML.
    Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms" (first-order MAML).
"""

from __future__ import annotations

from dataclasses import dataclass

from metagrad.algorithms.base import Algorithm

__all__ = ["MAML"]


@dataclass(frozen=True, eq=False)
class MAML(Algorithm):
    """Model-agnostic meta-learning: all parameters adapted, second order unless ``first_order``."""


ALGORITHM = MAML
"""What ``algorithms/registry.py`` registers of this file."""
