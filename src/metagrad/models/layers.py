"""Building blocks of the standard few-shot networks.

BatchNorm is written out from the batch mean and (biased) variance instead of calling
``F.batch_norm``: in torch 2.13, ``F.batch_norm(training=True)`` under ``torch.func.vmap`` inside a
second-order ``torch.func.grad`` returns wrong meta-gradients (the forward is right), while this
formulation is exact (``tests/models/test_layers.py`` checks it against finite differences and
against the per-task loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.errors import ConfigError

__all__ = ["BN_EPS", "NORM_INITS", "BatchNorm", "ConvBlock", "LinearBlock", "check_norm_init", "fc_init_",
           "maml_init_"]

BN_EPS = 1e-3
"""BatchNorm epsilon of learn2learn's few-shot networks (torch's default is 1e-5)."""

NORM_INITS = ("learn2learn", "ones")
"""How a conv block's BatchNorm scale starts: learn2learn's U[0, 1), or 1 (torch's default).

MAML's TensorFlow code has no BatchNorm scale at all (``tf.contrib.layers.batch_norm`` with its
default ``scale=False``), which is a scale of 1 that never changes; "ones" starts there.
"""


def check_norm_init(norm_init: str, name: str = "norm_init") -> None:
    """Raise ConfigError unless ``norm_init`` is one of ``NORM_INITS``; the message calls it ``name``."""
    if norm_init not in NORM_INITS:
        raise ConfigError(f"unknown {name} {norm_init!r}; valid: {', '.join(NORM_INITS)}")


def maml_init_(layer: nn.Conv2d | nn.Linear) -> None:
    """Xavier-uniform weight, zero bias: learn2learn's ``maml_init_``, drawn from torch's generator."""
    nn.init.xavier_uniform_(layer.weight, gain=1.0)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def fc_init_(layer: nn.Linear) -> None:
    """Truncated normal weight (std 0.01, cut at 2 std), zero bias: learn2learn's ``fc_init_``.

    learn2learn draws these from ``scipy.stats.truncnorm`` (numpy's global generator); we draw them
    from torch's, so ``torch.manual_seed`` alone makes a model reproducible.
    """
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class BatchNorm(nn.Module):
    """BatchNorm that always normalizes with the statistics of the batch it is given.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the mean and the biased variance taken
    over every dimension but the channel dimension 1. There are no running statistics and no buffers:
    train and test behave the same, so each task (each call, or each vmapped slice) is normalized with
    its own statistics. This is the transductive setting of MAML and learn2learn.

    Args:
        num_features: number of channels C.
        eps: added to the variance; learn2learn's few-shot networks use 1e-3.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x``: (B, C) or (B, C, H, W)."""
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast per-channel vectors over (B, C, ...)
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        var = centered.square().mean(dim=dims, keepdim=True)  # biased, as BatchNorm normalizes
        return centered * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ConvBlock(nn.Module):
    """3x3 convolution (padding 1), BatchNorm, ReLU, then a 2x2 max-pool or a stride-2 convolution.

    Initialization (learn2learn's ``ConvBlock``): convolution xavier-uniform with zero bias;
    BatchNorm weight uniform in [0, 1) (or 1, see ``norm_init``), bias zero. All drawn from torch's
    generator.

    Args:
        in_channels: input channels.
        out_channels: filters.
        strided: True for the MAML paper's Omniglot variant (stride-2 convolution, no pooling);
            False for a stride-1 convolution followed by a 2x2 max-pool.
        norm_init: "learn2learn" (BatchNorm weight U[0, 1)) or "ones" (weight 1); see ``NORM_INITS``.
            "ones" draws nothing for it, so the next draws of torch's generator come earlier.

    Raises:
        ConfigError: ``norm_init`` is not one of ``NORM_INITS``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, strided: bool = False,
                 norm_init: str = "learn2learn") -> None:
        super().__init__()
        check_norm_init(norm_init)
        self.strided = strided
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2 if strided else 1, padding=1)
        self.norm = BatchNorm(out_channels)  # weight 1, bias 0
        maml_init_(self.conv)
        if norm_init == "learn2learn":
            nn.init.uniform_(self.norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W') with H' = ceil(H/2) if strided else floor(H/2)."""
        x = F.relu(self.norm(self.conv(x)))
        return x if self.strided else F.max_pool2d(x, 2)


class LinearBlock(nn.Sequential):
    """Linear, BatchNorm, ReLU (learn2learn's ``LinearBlock``: truncated-normal linear, BatchNorm 1/0)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        linear = nn.Linear(in_features, out_features)
        fc_init_(linear)
        super().__init__(linear, BatchNorm(out_features), nn.ReLU())
