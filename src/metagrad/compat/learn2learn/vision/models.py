"""``l2l.vision.models``: learn2learn's constructor signatures over metagrad's networks.

Each model has learn2learn's ``.features`` and ``.classifier`` submodules. Differences from
learn2learn: BatchNorm always uses batch statistics (learn2learn's ``OmniglotCNN`` and
``MiniImagenetCNN`` keep running statistics they then ignore in training) and every initial value
comes from torch's generator (learn2learn draws some from numpy's global state via scipy).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metagrad import models
from metagrad.compat.learn2learn._missing import missing_names
from metagrad.errors import ConfigError
from metagrad.models.layers import ConvBlock, maml_init_

__all__ = ["CNN4", "MiniImagenetCNN", "OmniglotCNN", "OmniglotFC"]


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


class CNN4(nn.Module):
    """learn2learn's ``CNN4`` (and ``MiniImagenetCNN``, its alias in learn2learn 0.2.0): conv blocks of
    ``hidden_size`` 3x3 filters with BatchNorm and ReLU, each halving the image (2x2 max-pool, or a
    stride-2 convolution with ``max_pool=False``), flattened into ``embedding_size`` features, then a head.

    Built from metagrad's ``ConvBlock`` (BatchNorm with batch statistics, eps 1e-3; learn2learn's
    initialization: xavier-uniform convolutions and head, BatchNorm weight U[0, 1)).

    Args:
        output_size: number of classes (ways).
        hidden_size: filters per convolution.
        layers: number of conv blocks, 3 or 4 (learn2learn shrinks by ``2 * (4 // layers)`` per block,
            which is 2 only for those).
        channels: input channels.
        max_pool: halve with a max-pool (True) or with stride-2 convolutions (False).
        embedding_size: flattened feature size; None for ``25 * hidden_size`` (84x84 inputs, 4 layers).

    Shapes:
        x: (B, channels, H, W) -> logits (B, output_size); ``features(x)``: (B, embedding_size).

    Raises:
        ConfigError: ``layers`` is not 3 or 4, or a size is not positive.
    """

    def __init__(self, output_size: int, hidden_size: int = 64, layers: int = 4, channels: int = 3,
                 max_pool: bool = True, embedding_size: int | None = None) -> None:
        super().__init__()
        if layers not in (3, 4):
            raise ConfigError(f"CNN4 supports layers=3 or 4 (each block halves the image), got {layers}")
        sizes = {"output_size": output_size, "hidden_size": hidden_size, "channels": channels}
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        embedding_size = 25 * hidden_size if embedding_size is None else embedding_size
        blocks = [ConvBlock(channels if i == 0 else hidden_size, hidden_size, strided=not max_pool)
                  for i in range(layers)]
        self.features = nn.Sequential(*blocks, nn.Flatten())  # (B, hidden, h, w) -> (B, hidden * h * w)
        self.classifier = nn.Linear(embedding_size, output_size)
        maml_init_(self.classifier)
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        """(B, channels, H, W) images -> (B, output_size) logits."""
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4
"""learn2learn 0.2.0 defines ``MiniImagenetCNN = CNN4`` (64 filters, 1600 features on 84x84 images)."""


_NO_BACKBONES = ("ResNet12, WRN28 and their pretrained weights are not provided; build the network from "
                 "metagrad.models' layers (the batched path) or torch's, and check it with metagrad check")
_NOT_PROVIDED = {
    "ResNet12": _NO_BACKBONES, "ResNet12Backbone": _NO_BACKBONES, "WRN28": _NO_BACKBONES,
    "WRN28Backbone": _NO_BACKBONES, "get_pretrained_backbone": _NO_BACKBONES,
    "CNN4Backbone": "use CNN4(...).features", "ConvBase": "use CNN4(...).features",
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
