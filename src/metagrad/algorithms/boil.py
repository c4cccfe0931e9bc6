"""BOIL: MAML whose inner loop adapts only the body and freezes the head.

The inner loop updates the feature extractor (``model.features``) while the classifier
(``model.classifier``) keeps its meta-learned weights inside each task; the outer loop meta-learns both.
The paper's argument: a frozen head forces the body to change its representation on each task
("representation change") instead of reusing it, as ANIL's adapted head does.

References:
    Oh, Yoo, Kim & Yun 2021, "BOIL: Towards Representation Change for Few-shot Learning", ICLR.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from metagrad.algorithms.base import Algorithm, body_and_head_names

__all__ = ["BOIL"]


@dataclass(frozen=True, eq=False)
class BOIL(Algorithm):
    """Body only inner loop: only ``features.*`` adapts; needs ``.features`` and ``.classifier``."""

    name = "boil"

    def adapted(self, model: nn.Module, names: list[str]) -> list[str]:
        return body_and_head_names(model, names)[0]


ALGORITHM = BOIL
"""What ``algorithms/registry.py`` registers of this file."""
