"""metagrad's layers and networks inside ``task_batch(T)`` equal running each task on its own."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from metagrad.functional import forward_with
from metagrad.models import CifarCNN, MiniImagenetCNN, OmniglotCNN, OmniglotFC
from metagrad.models.layers import (
    BatchNorm,
    Conv2d,
    ConvBlock,
    Flatten,
    Linear,
    LinearBlock,
    MaxPool2d,
    SpatialMean,
    batched_tasks,
    task_batch,
    task_batch_obstacle,
)

TASKS = 3

CASES = {
    "omniglot-cnn": (lambda: OmniglotCNN(3, hidden_size=8), (1, 28, 28)),
    "omniglot-cnn-strided": (lambda: OmniglotCNN(3, hidden_size=8, strided=True), (1, 28, 28)),
    "omniglot-fc": (lambda: OmniglotFC(3, input_size=64, sizes=(16, 8)), (1, 8, 8)),
    "mini-imagenet-cnn": (lambda: MiniImagenetCNN(3, hidden_size=4, layers=2), (3, 84, 84)),
    "cifar-cnn": (lambda: CifarCNN(3, hidden_size=4), (3, 32, 32)),
}

# name -> (layer factory, one task's input shape (B, ...)); each layer alone, as a user composes them.
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv": (lambda: Conv2d(2, 3, 3, padding=1), (4, 2, 6, 6)),
    "conv-strided-no-bias": (lambda: Conv2d(2, 3, 3, stride=2, bias=False), (4, 2, 7, 7)),
    "conv-groups-dilation": (lambda: Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (4, 4, 6, 6)),
    "conv-1x1": (lambda: Conv2d(2, 5, 1), (4, 2, 5, 5)),
    "conv-reflect-same": (lambda: Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (4, 2, 5, 5)),
    "linear": (lambda: Linear(5, 4), (6, 5)),
    "linear-no-bias": (lambda: Linear(5, 4, bias=False), (6, 5)),
    "linear-sequence": (lambda: Linear(5, 4), (6, 2, 5)),
    "batchnorm-2d": (lambda: BatchNorm(3), (5, 3, 4, 4)),
    "batchnorm-1d": (lambda: BatchNorm(3), (5, 3)),
    "maxpool": (lambda: MaxPool2d(2), (4, 3, 6, 6)),
    "maxpool-3-stride-2": (lambda: MaxPool2d(3, stride=2, padding=1), (4, 3, 7, 7)),
    "flatten": (lambda: Flatten(), (4, 3, 2, 2)),
    "flatten-middle": (lambda: Flatten(1, 2), (4, 3, 2, 5)),
    "spatial-mean": (lambda: SpatialMean(), (4, 3, 5, 5)),
    "conv-block": (lambda: ConvBlock(2, 3), (4, 2, 6, 6)),
    "conv-block-strided": (lambda: ConvBlock(2, 3, strided=True), (4, 2, 6, 6)),
    "linear-block": (lambda: LinearBlock(5, 4), (6, 5)),
}


def _randomized(module: nn.Module) -> nn.Module:
    """Double precision and non-trivial values everywhere (BatchNorm starts at 1 and 0 otherwise)."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.0, 1.0)
    return module


def _tensors(module: nn.Module, per_task: bool) -> dict[str, Tensor]:
    params = dict(module.named_parameters())
    if per_task:  # a different copy of every parameter per task, as after an inner step
        return {k: v + 0.1 * torch.randn(TASKS, *v.shape, dtype=v.dtype) for k, v in params.items()}
    return params


def _under(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _inputs(shape: tuple[int, ...]) -> Tensor:
    scale = torch.arange(1, TASKS + 1, dtype=torch.float64).view(-1, *[1] * len(shape))  # other statistics
    return torch.randn(TASKS, *shape, dtype=torch.float64) * scale


@pytest.mark.parametrize("per_task", [False, True], ids=["shared", "per-task"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_in_a_meta_batch_equals_each_task_alone(name: str, per_task: bool) -> None:
    torch.manual_seed(0)
    factory, shape = LAYERS[name]
    layer = _randomized(factory())
    params = _tensors(layer, per_task)
    x = _inputs(shape)
    with task_batch(TASKS):
        out = forward_with(layer, params, {}, x)
    for t in range(TASKS):
        own = {k: v[t] if per_task else v for k, v in params.items()}
        assert_close(out[t], forward_with(layer, own, {}, x[t]))  # the single-task forward
    if params:  # and the second-order gradients agree too (MAML differentiates the inner gradient)
        def second(y: Tensor, wrt: list[Tensor]) -> tuple[Tensor, ...]:
            g = torch.autograd.grad(y.sin().sum(), wrt, create_graph=True)
            return torch.autograd.grad(sum(gi.square().sum() for gi in g), wrt)

        wrt = [v.detach().requires_grad_() for v in params.values()]
        named = dict(zip(params, wrt))
        with task_batch(TASKS):
            batched = second(forward_with(layer, named, {}, x), wrt)
        own = [{k: v[t] if per_task else v for k, v in named.items()} for t in range(TASKS)]
        looped = second(torch.stack([forward_with(layer, own[t], {}, x[t]) for t in range(TASKS)]), wrt)
        for a, b in zip(batched, looped):
            assert_close(a, b)


@pytest.mark.parametrize("per_task", [False, True], ids=["shared", "per-task"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_network_in_a_meta_batch_equals_each_task_alone(name: str, per_task: bool) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory().double()
    params = _tensors(model, per_task)
    x = _inputs((4, *shape))
    with task_batch(TASKS):
        logits = forward_with(model, params, {}, x)
        features = forward_with(model.features, _under(params, "features."), {}, x)
    assert logits.shape == (TASKS, 4, 3)
    for t in range(TASKS):
        own = {k: v[t] if per_task else v for k, v in params.items()}
        assert_close(logits[t], forward_with(model, own, {}, x[t]))
        assert_close(features[t], forward_with(model.features, _under(own, "features."), {}, x[t]))


@pytest.mark.parametrize("per_task", [False, True], ids=["shared", "per-task"])
def test_conv_layers_pass_views_without_copies(per_task: bool) -> None:
    # A layer returns a (T, B, C, H, W) view of its contiguous (B, T, C, H, W) result; the next layer
    # reads it back as (B, T*C, H, W) or (B*T, C, H, W) without a copy.
    block = ConvBlock(2, 3).double()
    params = _tensors(block, per_task)
    x = _inputs((4, 2, 8, 8))
    with task_batch(TASKS):
        conv = forward_with(block.conv, _under(params, "conv."), {}, x)
        normed = forward_with(block.norm, _under(params, "norm."), {}, conv)
        pooled = block.pool(torch.relu(normed))
    for h in (conv, normed, pooled):
        assert h.shape[:2] == (TASKS, 4)
        assert not h.is_contiguous() and h.transpose(0, 1).is_contiguous()
    with task_batch(TASKS):
        flat = Flatten()(pooled)
    assert flat.shape == (TASKS, 4, 3 * 4 * 4) and flat.data_ptr() == pooled.data_ptr()  # a view


def test_the_context_is_scoped() -> None:
    assert batched_tasks() is None
    with task_batch(4):
        assert batched_tasks() == 4
        with task_batch(8):
            assert batched_tasks() == 8
        assert batched_tasks() == 4
    assert batched_tasks() is None
    layer = Linear(3, 2)
    per_task = {k: v.expand(4, *v.shape) for k, v in layer.named_parameters()}
    with pytest.raises(ValueError, match=r"Linear inside task_batch\(4\) takes \(T, B, \.\.\., F\)"), \
            task_batch(4):
        forward_with(layer, per_task, {}, torch.randn(2, 5, 3))
    assert batched_tasks() is None


def test_what_stands_in_the_way_of_batching() -> None:
    assert task_batch_obstacle(OmniglotCNN(3, hidden_size=4)) is None
    mlp = nn.Sequential(Flatten(), Linear(4, 4), nn.ReLU(), nn.Dropout(), Linear(4, 2))
    assert task_batch_obstacle(mlp) is None
    assert "classifier (Linear) has parameters" in task_batch_obstacle(
        nn.ModuleDict({"features": Flatten(), "classifier": nn.Linear(4, 2)}))
    assert "0 (Softmax) is not one of metagrad's layers" in task_batch_obstacle(nn.Sequential(nn.Softmax(1)))
    model = OmniglotCNN(3, hidden_size=4)
    model.register_buffer("scale", torch.ones(()))
    assert task_batch_obstacle(model) == "OmniglotCNN has buffers"
