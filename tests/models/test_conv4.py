"""The standard networks: shapes, parameter names, initialization, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metagrad.errors import ConfigError
from metagrad.models import HEAD_PREFIX, MODELS, MiniImagenetCNN, OmniglotCNN, OmniglotFC, build_model
from metagrad.models.layers import BatchNorm

CASES = [
    ("omniglot-cnn", {}, (1, 28, 28), 64),
    ("omniglot-cnn", {"strided": True}, (1, 28, 28), 64),
    ("omniglot-fc", {}, (1, 28, 28), 64),
    ("mini-imagenet-cnn", {}, (3, 84, 84), 800),
    ("cifar-cnn", {}, (3, 32, 32), 128),  # 32-16-8-4-2: 2 * 2 * 32
    ("mini-imagenet-cnn", {"image_size": 32}, (3, 32, 32), 128),
]


@pytest.mark.parametrize(("name", "kwargs", "image_shape", "features"), CASES)
def test_shapes_and_head(name: str, kwargs: dict, image_shape: tuple[int, ...], features: int) -> None:
    model = build_model(name, 5, **kwargs)
    x = torch.rand(3, *image_shape)
    assert model.features(x).shape == (3, features)
    assert model(x).shape == (3, 5)
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(model(x), model.classifier(model.features(x)))
    head = [k for k, _ in model.named_parameters() if k.startswith(HEAD_PREFIX)]
    assert head == ["classifier.weight", "classifier.bias"]
    assert all(k.startswith(("features.", HEAD_PREFIX)) for k, _ in model.named_parameters())
    assert list(model.buffers()) == []


def test_omniglot_cnn_layouts() -> None:
    pooled, strided = OmniglotCNN(5), OmniglotCNN(5, strided=True)
    x = torch.rand(2, 1, 28, 28)
    assert pooled.features[:4](x).shape == (2, 64, 1, 1)  # 28-14-7-3-1
    assert strided.features[:4](x).shape == (2, 64, 2, 2)  # 28-14-7-4-2
    assert [m.conv.stride for m in strided.features[:4]] == [(2, 2)] * 4
    assert [m.conv.stride for m in pooled.features[:4]] == [(1, 1)] * 4
    assert OmniglotCNN(5, hidden_size=16, layers=3).features(x).shape == (2, 16)


def test_mini_imagenet_layers_and_fc_sizes() -> None:
    x = torch.rand(2, 3, 84, 84)
    assert MiniImagenetCNN(5, hidden_size=8, layers=2).features(x).shape == (2, 8 * 21 * 21)
    assert OmniglotFC(5, input_size=64, sizes=(16, 8))(torch.rand(4, 1, 8, 8)).shape == (4, 5)
    widths = [m.out_features for m in OmniglotFC(5).modules() if isinstance(m, nn.Linear)]
    assert widths == [256, 128, 64, 64, 5]


def test_initialization_follows_learn2learn_from_torch_generator() -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(5)
    torch.manual_seed(0)
    again = OmniglotCNN(5)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    block = model.features[1]
    bound = (6 / (2 * 64 * 9)) ** 0.5  # xavier-uniform for a 64->64 3x3 convolution
    assert block.conv.weight.abs().max() <= bound and block.conv.weight.abs().max() > 0.9 * bound
    assert torch.all(block.conv.bias == 0) and torch.all(block.norm.bias == 0)
    assert 0 <= block.norm.weight.min() and block.norm.weight.max() < 1
    assert 0.7 < model.classifier.weight.std() < 1.3 and torch.all(model.classifier.bias == 0)

    fc = OmniglotFC(5)
    linear = fc.features[1][0]
    assert linear.weight.abs().max() <= 0.02 and 0.006 < linear.weight.std() < 0.01
    assert torch.all(fc.features[1][1].weight == 1)
    mini = MiniImagenetCNN(5)
    bound = (6 / (800 + 5)) ** 0.5
    assert mini.classifier.weight.abs().max() <= bound and torch.all(mini.classifier.bias == 0)


def test_batch_norm_everywhere_with_learn2learn_eps() -> None:
    for name in MODELS:
        norms = [m for m in build_model(name, 5).modules() if isinstance(m, BatchNorm)]
        assert len(norms) == 4 and all(m.eps == 1e-3 for m in norms)


def test_build_model_errors() -> None:
    with pytest.raises(ConfigError, match="cifar-cnn, mini-imagenet-cnn, omniglot-cnn, omniglot-fc"):
        build_model("resnet", 5)
    with pytest.raises(ConfigError, match="ways"):
        build_model("omniglot-cnn", 0)
    with pytest.raises(ConfigError, match="strided"):
        build_model("mini-imagenet-cnn", 5, strided=True)
    with pytest.raises(ConfigError, match="layers"):
        MiniImagenetCNN(5, layers=7)
    with pytest.raises(ConfigError, match="layers=6 pools 32-pixel images away; use 5 or fewer"):
        build_model("cifar-cnn", 5, layers=6)
    with pytest.raises(ConfigError, match="sizes"):
        OmniglotFC(5, sizes=())


@pytest.mark.parametrize("make", [lambda init: OmniglotCNN(5, strided=True, norm_init=init),
                                  lambda init: MiniImagenetCNN(5, hidden_size=8, norm_init=init)])
def test_norm_init_ones_starts_batchnorm_at_one_and_changes_nothing_else(make) -> None:
    torch.manual_seed(0)
    uniform = make("learn2learn")
    torch.manual_seed(0)
    ones = make("ones")
    norms = [m for m in ones.modules() if isinstance(m, BatchNorm)]
    assert len(norms) == 4 and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert not any(torch.all(m.weight == 1) for m in uniform.modules() if isinstance(m, BatchNorm))
    # Same parameter names and shapes, so checkpoints of either load into the other; the first
    # convolution is drawn before any BatchNorm, so it is the same draw in both.
    shapes = [{k: v.shape for k, v in model.named_parameters()} for model in (uniform, ones)]
    assert shapes[0] == shapes[1]
    torch.testing.assert_close(ones.features[0].conv.weight, uniform.features[0].conv.weight)
    with pytest.raises(ConfigError, match="unknown norm_init 'zero'; valid: learn2learn, ones"):
        make("zero")


def test_norm_init_models_are_the_ones_that_take_it() -> None:
    import inspect

    from metagrad.models import NORM_INIT_MODELS

    takes = {name for name, make in MODELS.items() if "norm_init" in inspect.signature(make).parameters}
    assert takes == set(NORM_INIT_MODELS)
