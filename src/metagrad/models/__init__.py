"""The standard few-shot networks, the layers they are built from, and a name -> constructor registry.

A network built from these layers (``BatchNorm``, ``Conv2d``, ``Linear``, ``MaxPool2d``, ``Flatten``,
``SpatialMean``, ``ConvBlock``, ``LinearBlock``), with any forward of its own, runs on the batched
strategy (``layers.task_batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from metagrad.errors import ConfigError
from metagrad.models.conv4 import CifarCNN, MiniImagenetCNN, OmniglotCNN, OmniglotFC
from metagrad.models.layers import (
    BatchNorm,
    Conv2d,
    ConvBlock,
    Flatten,
    Linear,
    LinearBlock,
    MaxPool2d,
    SpatialMean,
    task_batch,
)

__all__ = [
    "HEAD_PREFIX", "IMAGE_SIZE_MODELS", "MODELS", "NORM_INIT_MODELS", "BatchNorm", "CifarCNN", "Conv2d",
    "ConvBlock", "Flatten", "Linear", "LinearBlock", "MaxPool2d", "MiniImagenetCNN", "OmniglotCNN",
    "OmniglotFC", "SpatialMean", "build_model", "task_batch",
]

HEAD_PREFIX = "classifier."
"""Names of head (last linear layer) parameters start with this; ANIL's inner loop adapts only these."""

MODELS: dict[str, Callable[..., nn.Module]] = {
    "omniglot-cnn": OmniglotCNN,
    "omniglot-fc": OmniglotFC,
    "mini-imagenet-cnn": MiniImagenetCNN,
    "cifar-cnn": CifarCNN,
}
"""Model name -> constructor taking ``ways`` first."""

NORM_INIT_MODELS = ("omniglot-cnn", "mini-imagenet-cnn", "cifar-cnn")
"""The models whose constructor takes ``norm_init`` (the conv networks; the FC one starts BatchNorm at 1)."""

IMAGE_SIZE_MODELS = ("mini-imagenet-cnn", "cifar-cnn")
"""The models whose head size follows the image side (constructor option ``image_size``)."""


def build_model(name: str, ways: int, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of ``MODELS`` ("omniglot-cnn", "omniglot-fc", "mini-imagenet-cnn", "cifar-cnn").
        ways: number of classes the head outputs.
        **kwargs: passed to the constructor (e.g. ``hidden_size``, ``layers``, ``strided``).

    Returns:
        The model, initialized from torch's global generator.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or bad constructor arguments.

    Example:
        >>> model = build_model("omniglot-cnn", ways=5, strided=True)
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](ways, **kwargs)
    except TypeError as err:  # an option the constructor does not take
        raise ConfigError(f"model {name!r}: {err}") from err
