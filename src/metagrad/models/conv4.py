"""The standard few-shot networks of MAML and learn2learn, each a feature body plus a linear head.

Every model has two submodules: ``features`` (the body, ending in a flat (B, D) output) and
``classifier`` (a linear layer from D to the ways), and ``forward(x) = classifier(features(x))``.
Each is a composition of metagrad's layers (``layers.py``), which also run a whole meta-batch of tasks
(``layers.task_batch``): the network is written once, for one task and for the batched strategy.
Head parameter names therefore start with ``"classifier."`` (``metagrad.models.HEAD_PREFIX``), which
is how ANIL picks the parameters its inner loop adapts.

BatchNorm always normalizes with the statistics of the batch it is given, in training and at test
time alike (the transductive setting of MAML and learn2learn); there are no running statistics and no
buffers. Initialization follows learn2learn (see ``layers.py``) but every value is drawn from torch's
generator, so ``torch.manual_seed`` alone reproduces a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

from metagrad.errors import ConfigError
from metagrad.models.layers import ConvBlock, Flatten, Linear, LinearBlock, SpatialMean, fc_init_, maml_init_

__all__ = ["CIFAR_SIZE", "MINI_IMAGENET_SIZE", "CifarCNN", "MiniImagenetCNN", "OmniglotCNN", "OmniglotFC"]

MINI_IMAGENET_SIZE = 84
"""Side of a Mini-ImageNet image; the CNN's head size is derived from it."""

CIFAR_SIZE = 32
"""Side of a CIFAR-FS or FC100 image."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")


class OmniglotCNN(nn.Module):
    """Four conv blocks of ``hidden_size`` 3x3 filters, then a linear head (Finn et al. 2017, Omniglot).

    Each block is conv 3x3 (padding 1), BatchNorm (eps 1e-3, batch statistics), ReLU and a 2x2 max-pool;
    with ``strided=True`` the convolution has stride 2 and there is no pool (the MAML paper's variant,
    which learn2learn's ``OmniglotCNN`` implements). The body ends with a mean over the remaining spatial
    positions: on 1x28x28 inputs the max-pool variant ends at 1x1 (28-14-7-3-1), so this is a flatten;
    the strided one ends at 2x2 (28-14-7-4-2), averaged as in the MAML paper.

    Initialization: convolutions xavier-uniform, zero bias; BatchNorm weight U[0, 1) (learn2learn) or 1
    (``norm_init="ones"``), bias 0; head weight N(0, 1), zero bias (as learn2learn and the MAML
    reference code).

    Args:
        ways: number of classes N (head outputs).
        hidden_size: filters per convolution.
        layers: number of conv blocks.
        strided: stride-2 convolutions instead of max-pooling.
        norm_init: how BatchNorm's weight starts: "learn2learn" (U[0, 1)) or "ones".
        channels: input channels (1 for Omniglot; 3 for color images of your own).

    Shapes:
        x: (B, channels, H, W) with H, W >= 2**layers -> logits (B, ways). ``features(x)``: (B, hidden_size).

    References:
        Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML.
    """

    def __init__(self, ways: int, hidden_size: int = 64, layers: int = 4, strided: bool = False,
                 norm_init: str = "learn2learn", channels: int = 1) -> None:
        super().__init__()
        _check_positive(ways=ways, hidden_size=hidden_size, layers=layers, channels=channels)
        blocks = [ConvBlock(channels if i == 0 else hidden_size, hidden_size, strided=strided,
                            norm_init=norm_init) for i in range(layers)]
        self.features = nn.Sequential(*blocks, SpatialMean())
        self.classifier = Linear(hidden_size, ways)
        nn.init.normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, channels, H, W) images -> (B, ways) logits."""
        return self.classifier(self.features(x))


class OmniglotFC(nn.Module):
    """Fully-connected Omniglot network: flatten, ``sizes`` blocks of [linear, BatchNorm, ReLU], linear head.

    The default 784-256-128-64-64 is Santoro et al. 2016's network as used by MAML and learn2learn
    (``OmniglotFC``). BatchNorm uses eps 1e-3 and batch statistics. Initialization: linear weights
    truncated normal (std 0.01, cut at 2 std), zero biases; BatchNorm weight 1, bias 0.

    Args:
        ways: number of classes N.
        input_size: flattened image size (28*28 for Omniglot).
        sizes: hidden layer widths.

    Shapes:
        x: (B, ...) with ``input_size`` elements per sample -> logits (B, ways).

    References:
        Santoro et al. 2016, "Meta-Learning with Memory-Augmented Neural Networks", ICML.
    """

    def __init__(self, ways: int, input_size: int = 784, sizes: Sequence[int] = (256, 128, 64, 64)) -> None:
        super().__init__()
        if len(sizes) == 0:
            raise ConfigError("sizes must name at least one hidden layer width")
        _check_positive(ways=ways, input_size=input_size, **{f"sizes[{i}]": s for i, s in enumerate(sizes)})
        widths = [input_size, *sizes]
        self.features = nn.Sequential(
            Flatten(), *(LinearBlock(a, b) for a, b in itertools.pairwise(widths))
        )
        self.classifier = Linear(widths[-1], ways)
        fc_init_(self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) images -> (B, ways) logits."""
        return self.classifier(self.features(x))


class MiniImagenetCNN(nn.Module):
    """Four blocks of [conv 3x3 (padding 1), BatchNorm, ReLU, 2x2 max-pool] with ``hidden_size`` filters.

    On 3x84x84 images the maps shrink 84-42-21-10-5, so the body outputs 5*5*hidden_size (800 for the
    standard 32 filters) flattened features. BatchNorm uses eps 1e-3 and batch statistics.
    Initialization: convolutions and head xavier-uniform with zero bias; BatchNorm weight U[0, 1), bias 0
    (learn2learn's ``MiniImagenetCNN``), or weight 1 with ``norm_init="ones"``.

    Args:
        ways: number of classes N.
        hidden_size: filters per convolution.
        layers: number of conv blocks (the image side is halved, rounding down, once per block).
        norm_init: how BatchNorm's weight starts: "learn2learn" (U[0, 1)) or "ones".
        channels: input channels (3 for Mini-ImageNet; 1 for grayscale images of your own).
        image_size: the side of the square input images (84 for Mini-ImageNet); sizes the head.

    Shapes:
        x: (B, channels, image_size, image_size) -> logits (B, ways). ``features(x)``: (B, hidden_size * s
        * s), s = 5 for 4 layers on 84-pixel images.

    References:
        Ravi and Larochelle 2017, "Optimization as a Model for Few-Shot Learning", ICLR.
    """

    def __init__(self, ways: int, hidden_size: int = 32, layers: int = 4, norm_init: str = "learn2learn",
                 channels: int = 3, image_size: int = MINI_IMAGENET_SIZE) -> None:
        super().__init__()
        _check_positive(ways=ways, hidden_size=hidden_size, layers=layers, channels=channels,
                        image_size=image_size)
        side = image_size
        for _ in range(layers):
            side //= 2
        if side < 1:
            raise ConfigError(f"layers={layers} pools {image_size}-pixel images away; use "
                              f"{image_size.bit_length() - 1} or fewer")
        blocks = [ConvBlock(channels if i == 0 else hidden_size, hidden_size, norm_init=norm_init)
                  for i in range(layers)]
        # (B, hidden, side, side) -> (B, hidden * side * side)
        self.features = nn.Sequential(*blocks, Flatten())
        self.classifier = Linear(hidden_size * side * side, ways)
        maml_init_(self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """(B, channels, image_size, image_size) images -> (B, ways) logits."""
        return self.classifier(self.features(x))


class CifarCNN(MiniImagenetCNN):
    """MAML's Mini-ImageNet network on 3x32x32 images (CIFAR-FS, FC100): the maps shrink 32-16-8-4-2, so
    the body outputs 2*2*hidden_size (128 for 32 filters) flattened features.

    This is the network Bertinetto et al. 2019 trained MAML with on CIFAR-FS (MAML's four 32-filter blocks,
    at CIFAR's resolution); everything else is :class:`MiniImagenetCNN`'s.

    References:
        Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers", ICLR.
    """

    def __init__(self, ways: int, hidden_size: int = 32, layers: int = 4,
                 norm_init: str = "learn2learn", channels: int = 3, image_size: int = CIFAR_SIZE) -> None:
        super().__init__(ways, hidden_size, layers, norm_init, channels=channels, image_size=image_size)
