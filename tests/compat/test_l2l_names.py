"""learn2learn 0.2.0's small names everyday scripts use (``l2l.nn.Lambda``, ``l2l.nn.Flatten``,
``l2l.utils.accuracy``, ``l2l.magic_box``, ``l2l.__version__``), and the error for a name not provided."""

from __future__ import annotations

import pytest
import torch

import metagrad.compat.learn2learn as l2l


def test_version_is_the_learn2learn_release_followed() -> None:
    assert l2l.__version__ == "0.2.0"


def test_lambda_and_flatten_in_a_network() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), l2l.nn.Lambda(lambda x: x * 2), l2l.nn.Flatten())
    x = torch.randn(4, 1, 5, 5)
    torch.testing.assert_close(net(x), (net[0](x) * 2).reshape(4, -1))
    assert l2l.nn.Lambda(lambda a, b=1: a + b)(1, b=2) == 3  # positional and keyword arguments pass through
    with pytest.raises(RuntimeError):  # a view, as learn2learn's: a non-contiguous input is refused
        l2l.nn.Flatten()(torch.randn(3, 4, 5).transpose(0, 2))


def test_a_cloned_network_with_lambda_and_flatten_adapts() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), l2l.nn.Lambda(torch.relu), l2l.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    maml = l2l.algorithms.MAML(net, lr=0.1)
    learner = maml.clone()
    x, y = torch.randn(6, 3), torch.tensor([0, 1] * 3)
    learner.adapt(torch.nn.functional.cross_entropy(learner(x), y))
    torch.nn.functional.cross_entropy(learner(x), y).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_accuracy_as_learn2learn() -> None:
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    acc = l2l.utils.accuracy(preds, torch.tensor([1.0, 1.0, 1.0, 0.0]))  # float labels, as MiniImagenet's
    assert acc.dtype == torch.float32 and acc.item() == pytest.approx(0.75)
    assert l2l.accuracy is l2l.utils.accuracy  # learn2learn exports its utils at the top level too


def test_magic_box_is_one_with_the_gradient_of_its_argument() -> None:
    x = torch.tensor([0.5, -1.0], requires_grad=True)
    boxed = l2l.magic_box(3 * x)
    torch.testing.assert_close(boxed.detach(), torch.ones(2))
    (boxed * torch.tensor([2.0, 5.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([6.0, 15.0]))
    assert l2l.utils.magic_box(2.5) == 2.5  # not a tensor: returned as it is


@pytest.mark.parametrize("module, name, hint", [
    (l2l.nn, "Scale", "nn.Parameter"),
    (l2l, "optim", "MAML or MetaSGD"),
    (l2l.algorithms, "meta_sgd_update", "MetaSGD"),
    (l2l.algorithms, "LightningMAML", "metagrad train"),
    (l2l.vision.datasets, "VGGFlower102", "load_dataset(\"folder\""),
    (l2l.vision.models, "ResNet12", "metagrad check"),
    (l2l.utils, "flatten_config", "dataclasses.asdict"),
])
def test_a_name_not_provided_says_what_to_use(module, name: str, hint: str) -> None:
    with pytest.raises(AttributeError, match="MIGRATION.md") as info:
        getattr(module, name)
    assert hint in str(info.value) and f".{name} is not provided" in str(info.value)


def test_an_unknown_name_points_at_the_guide() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'.*MIGRATION.md"):
        l2l.nn.Nope  # noqa: B018
    assert not hasattr(l2l.nn, "__wrapped__")  # Python's own probes get the plain error
