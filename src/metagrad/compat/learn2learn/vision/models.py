"""``l2l.vision.models``: learn2learn's constructor signatures over metagrad's networks.

Each model has learn2learn's ``.features`` and ``.classifier`` submodules. Differences from
learn2learn: BatchNorm always uses batch statistics (learn2learn's ``OmniglotCNN`` and
``MiniImagenetCNN`` keep running statistics they then ignore in training) and every initial value
comes from torch's generator (learn2learn draws some from numpy's global state via scipy).
"""

from __future__ import annotations

from collections.abc import Sequence

from metagrad import models

__all__ = ["MiniImagenetCNN", "OmniglotCNN", "OmniglotFC"]


class OmniglotCNN(models.OmniglotCNN):
    """learn2learn's ``OmniglotCNN``: the MAML paper's strided 4-layer CNN on (1, 28, 28) inputs.

    Args:
        output_size: number of classes (ways).
        hidden_size: filters per convolution.
        layers: number of conv blocks.
    """

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4) -> None:
        super().__init__(output_size, hidden_size=hidden_size, layers=layers, strided=True)


class OmniglotFC(models.OmniglotFC):
    """learn2learn's ``OmniglotFC``: fully-connected layers ``sizes`` (default 256-128-64-64), then a head.

    Args:
        input_size: flattened input size (28**2 for Omniglot).
        output_size: number of classes (ways).
        sizes: hidden widths; None for the default.
    """

    def __init__(self, input_size: int, output_size: int, sizes: Sequence[int] | None = None) -> None:
        if sizes is None:
            super().__init__(output_size, input_size=input_size)
        else:
            super().__init__(output_size, input_size=input_size, sizes=tuple(sizes))


class MiniImagenetCNN(models.MiniImagenetCNN):
    """learn2learn's ``MiniImagenetCNN``: 4 conv blocks with max-pooling on (3, 84, 84) inputs.

    Args:
        output_size: number of classes (ways).
        hidden_size: filters per convolution (5*5*hidden_size features).
        layers: number of conv blocks.
    """

    def __init__(self, output_size: int, hidden_size: int = 32, layers: int = 4) -> None:
        super().__init__(output_size, hidden_size=hidden_size, layers=layers)
