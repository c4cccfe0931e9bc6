"""Models as users write them (their own ``nn.Module`` classes with torch's layers): the vectorized path
gives the per-task loop's meta-gradients and running statistics in float64, first and second order, or
the model is refused with a message that says what to do."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from maml_reference import random_episode, reference_task_loss
from torch import Tensor, nn
from torch.testing import assert_close

from metagrad.algorithms import (
    MAML,
    chunk_gradients,
    make,
    meta_batch_loss,
    meta_train_step,
    strategies,
    strategy_for,
)
from metagrad.errors import ConfigError
from metagrad.models import OmniglotCNN
from metagrad.models import layers as mg_layers
from metagrad.types import Episode

INNER_LR = 0.4
WAYS = 3


class ConvBN(nn.Module):
    """The issue's model: Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d -> Flatten -> Linear."""

    def __init__(self, **norm: object) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, **norm), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(8 * 4 * 4, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLPBatchNorm1d(nn.Module):
    def __init__(self, **norm: object) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 16), nn.BatchNorm1d(16, **norm), nn.Linear(16, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x.view(x.shape[0], -1)))))


class ConvNorm(nn.Module):
    """A conv net around any normalization layer of (B, 8, 8, 8) activations."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(1, 8, 3, padding=1), norm, nn.Linear(8 * 16, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.avg_pool2d(F.gelu(self.norm(self.conv(x))), 2), 1))


class Residual(nn.Module):
    """A stem and one residual block with BatchNorm (running statistics), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = F.relu(h + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean(dim=(2, 3)))


class ViewCat(nn.Module):
    """Two branches concatenated, with view / flatten / cat between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 5, padding=2)
        self.norm = nn.BatchNorm2d(6, track_running_stats=False)
        self.fc = nn.Linear(6 * 16, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.a(x), self.b(x)], dim=1)
        h = F.max_pool2d(F.relu(self.norm(h)), 2)
        return self.fc(h.view(h.shape[0], 6, -1).flatten(1))


class Tied(nn.Module):
    """One linear layer applied twice (tied weights) and its transpose as the head's input map."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(64, 12), nn.Linear(12, 12), nn.Linear(12, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.out(h @ self.shared.weight.t())


class Frozen(ConvBN):
    """The first convolution frozen (``requires_grad=False``), as when fine-tuning on a fixed stem."""

    def __init__(self) -> None:
        super().__init__(track_running_stats=False)
        self.features[0].requires_grad_(False)


class Unused(nn.Module):
    """A parameter the loss does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 10), nn.Linear(10, WAYS)
        self.spare = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x.flatten(1))))


class WithBuffers(nn.Module):
    """Buffers of its own: a fixed input mask and scale, read in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", (torch.rand(1, 8, 8) > 0.3).double())
        self.register_buffer("scale", torch.tensor(1.5))
        self.fc1, self.fc2 = nn.Linear(64, 10), nn.Linear(10, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.elu(self.fc1((x * self.mask * self.scale).flatten(1))))


class FunctionalBatchNorm(nn.Module):
    """BatchNorm written in forward with ``F.batch_norm`` and the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, WAYS)
        self.gamma, self.beta = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.batch_norm(self.conv(x), None, None, self.gamma, self.beta, training=True, eps=1e-3)
        return self.fc(F.relu(h).flatten(1))


def _with_statistics(model: nn.Module) -> nn.Module:
    """Running statistics as after some training, so that eval mode normalizes with something real."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model


# name -> factory; each checked vectorized against the per-task loop.
ZOO = {
    "bn2d-batch-stats": lambda: ConvBN(track_running_stats=False),
    "bn2d-running-stats": lambda: ConvBN(),
    "bn2d-no-affine": lambda: ConvBN(affine=False),
    "bn2d-no-affine-batch-stats": lambda: ConvBN(affine=False, track_running_stats=False),
    "bn2d-momentum-0.5": lambda: ConvBN(momentum=0.5),
    "bn1d-running-stats": lambda: MLPBatchNorm1d(),
    "bn1d-batch-stats": lambda: MLPBatchNorm1d(track_running_stats=False),
    "groupnorm": lambda: ConvNorm(nn.GroupNorm(2, 8)),
    "layernorm": lambda: ConvNorm(nn.LayerNorm([8, 8, 8])),
    "layernorm-last-dim": lambda: ConvNorm(nn.LayerNorm(8)),
    "instancenorm-affine": lambda: ConvNorm(nn.InstanceNorm2d(8, affine=True)),
    "residual": Residual,
    "view-cat": ViewCat,
    "tied": Tied,
    "frozen": Frozen,
    "unused-parameter": Unused,
    "buffers": WithBuffers,
    "functional-batch-norm": FunctionalBatchNorm,
    "bn2d-eval-mode": lambda: _with_statistics(ConvBN()).eval(),
    "dropout-eval": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5),
                                          nn.Linear(16, WAYS)).eval(),
}


def _episode(seed: int = 0, tasks: int = 3) -> Episode:
    return random_episode(tasks, WAYS, 2, 2, (1, 8, 8), seed=seed)


def _build(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().double()


def _meta(model: nn.Module, episode: Episode, *, vectorize: bool, first_order: bool = False,
          algorithm: str = "maml", steps: int = 2) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """(meta-loss, meta-gradient by name, buffers after) of ``model``'s own tensors."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    learner = make(algorithm, inner_lr=INNER_LR, inner_steps=steps, first_order=first_order)
    out = meta_batch_loss(learner, model, params, buffers, episode, vectorize=vectorize)
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    grads = torch.autograd.grad(out.loss, list(trainable.values()), allow_unused=True)
    grads = {k: g if g is not None else torch.zeros_like(p) for (k, p), g in zip(trainable.items(), grads)}
    return out.loss.detach(), grads, {k: b.clone() for k, b in buffers.items()}


def assert_dicts_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    scale = max((g.abs().max().item() for g in expected.values() if g.numel()), default=1.0)
    for k, value in expected.items():
        assert_close(actual[k], value, rtol=1e-7, atol=1e-10 * max(scale, 1e-12), msg=k)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_user_model_vectorized_matches_loop(name: str, first_order: bool) -> None:
    model = _build(ZOO[name])
    twin = copy.deepcopy(model)  # both paths update running statistics: each gets its own
    episode = _episode()
    assert strategy_for(MAML(), model, dict(model.named_parameters()), dict(model.named_buffers())) == "vmap"
    loss, grads, buffers = _meta(model, episode, vectorize=True, first_order=first_order)
    ref_loss, ref_grads, ref_buffers = _meta(twin, episode, vectorize=False, first_order=first_order)
    assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    assert_dicts_close(grads, ref_grads)
    assert_dicts_close(buffers, ref_buffers)


def test_running_statistics_move_as_in_the_loop() -> None:
    # 3 tasks x (2 support forwards + 1 query forward) = 9 BatchNorm calls, each an update.
    model = _build(ZOO["bn2d-running-stats"])
    before = {k: b.clone() for k, b in model.named_buffers()}
    _meta(model, _episode(), vectorize=True)
    after = dict(model.named_buffers())
    assert after["features.1.num_batches_tracked"].item() == 9
    assert not torch.equal(after["features.1.running_mean"], before["features.1.running_mean"])


@pytest.mark.parametrize("name", ["bn2d-running-stats", "residual", "frozen", "unused-parameter"])
def test_user_model_matches_finite_differences(name: str) -> None:
    model = _build(ZOO[name])
    episode = _episode(seed=1, tasks=2)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    buffers0 = {k: b.clone() for k, b in model.named_buffers()}

    def meta_loss() -> float:
        for k, b in model.named_buffers():  # each evaluation starts from the same statistics
            b.copy_(buffers0[k])
        with torch.no_grad():
            return meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=2), model,
                                   dict(model.named_parameters()), dict(model.named_buffers()), episode,
                                   vectorize=False).loss.item()

    _, grads, _ = _meta(model, episode, vectorize=True)
    direction = {k: torch.randn_like(p) for k, p in params.items()}
    h = 1e-6
    with torch.no_grad():
        for k, p in params.items():
            p.add_(direction[k], alpha=h)
    up = meta_loss()
    with torch.no_grad():
        for k, p in params.items():
            p.add_(direction[k], alpha=-2 * h)
    down = meta_loss()
    predicted = sum((grads[k] * direction[k]).sum() for k in params).item()
    assert (up - down) / (2 * h) == pytest.approx(predicted, rel=1e-5, abs=1e-9)


def test_frozen_parameters_are_neither_adapted_nor_updated() -> None:
    model = _build(ZOO["frozen"])
    episode = _episode()
    loss, grads, _ = _meta(model, episode, vectorize=True)
    assert "features.0.weight" not in grads
    unfrozen = copy.deepcopy(model).requires_grad_(True)  # the inner loop would adapt the stem too
    assert not torch.isclose(loss, _meta(unfrozen, episode, vectorize=True)[0])
    before = model.features[0].weight.clone()
    meta_train_step(MAML(inner_lr=INNER_LR, inner_steps=1), model,
                    torch.optim.Adam(model.parameters(), lr=0.1), episode)
    assert torch.equal(model.features[0].weight, before)


@pytest.mark.parametrize("name", ["bn2d-running-stats", "bn2d-batch-stats"])
def test_anil_on_user_models(name: str) -> None:
    model = _build(ZOO[name])  # ANIL adapts .classifier on the features of .features
    twin = copy.deepcopy(model)
    loss, grads, buffers = _meta(model, _episode(), vectorize=True, algorithm="anil")
    ref_loss, ref_grads, ref_buffers = _meta(twin, _episode(), vectorize=False, algorithm="anil")
    assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    assert_dicts_close(grads, ref_grads)
    assert_dicts_close(buffers, ref_buffers)


def test_dropout_draws_its_own_masks_per_task() -> None:
    model = _build(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5),
                                         nn.Linear(16, WAYS)))
    one = _episode(tasks=1)
    same = Episode(*(t.expand(4, *t.shape[1:])
                     for t in (one.support_x, one.support_y, one.query_x, one.query_y)))
    maml = MAML(inner_lr=INNER_LR, inner_steps=1)
    out = meta_batch_loss(maml, model, dict(model.named_parameters()), {}, same)
    assert out.task_losses.unique().numel() == 4  # the same task four times, four different masks


@pytest.mark.parametrize("name, why", [
    ("bn-momentum-none", "cumulative average"),
    ("instancenorm-running-stats", "tracks running statistics"),
])
def test_models_vmap_cannot_update_run_one_task_at_a_time(
        name: str, why: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies, "_LOGGED", set())  # the choice is logged once per model class
    factory = {"bn-momentum-none": lambda: ConvBN(momentum=None),
               "instancenorm-running-stats": lambda: ConvNorm(nn.InstanceNorm2d(8, track_running_stats=True))}
    model = _build(factory[name])
    twin = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="metagrad"):
        strategy = strategy_for(MAML(), model, dict(model.named_parameters()), dict(model.named_buffers()))
    assert strategy == "loop"
    assert why in caplog.text and "loop" in caplog.text
    _, grads, buffers = _meta(model, _episode(), vectorize=True)
    _, ref_grads, ref_buffers = _meta(twin, _episode(), vectorize=False)
    assert_dicts_close(grads, ref_grads)
    assert_dicts_close(buffers, ref_buffers)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        if h.sum() > 0:  # Python control flow on a tensor's value: vmap cannot batch it
            h = -h
        return self.fc(h)


def test_a_model_vmap_cannot_run_is_refused_with_the_fix() -> None:
    model = _build(DataDependent)
    with pytest.raises(ConfigError, match="DataDependent cannot run vectorized over tasks.*vectorize=False"):
        meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=1), model, dict(model.named_parameters()), {},
                        _episode())
    meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=1), model, dict(model.named_parameters()), {},
                    _episode(), vectorize=False)  # the loop runs it


class CountsItsCalls(nn.Module):
    """Updates a buffer of its own in place during forward (a running mean of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, WAYS)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.seen.add_(x.detach().mean())
        return self.fc(x.flatten(1))


def test_a_model_updating_its_own_buffer_is_refused_with_the_fix() -> None:
    model = _build(CountsItsCalls)
    with pytest.raises(ConfigError, match="CountsItsCalls cannot run vectorized over tasks.*vectorize=False"):
        meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=1), model, dict(model.named_parameters()),
                        dict(model.named_buffers()), _episode())


class Sequence(nn.Module):
    """A sequence model on (B, 4, 8) inputs: an LSTM or a Transformer encoder layer, then a linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = (nn.LSTM(8, 8, batch_first=True) if kind == "lstm"
                     else nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
        self.head = nn.Linear(8, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)[0] if self.kind == "lstm" else self.body(x)
        return self.head(h.mean(dim=1))


def _sequences(tasks: int = 2) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS).expand(tasks, WAYS)
    return Episode(torch.randn(tasks, WAYS, 4, 8, generator=g, dtype=torch.float64), labels,
                   torch.randn(tasks, WAYS, 4, 8, generator=g, dtype=torch.float64), labels)


def test_an_lstm_runs_one_task_at_a_time_and_exactly() -> None:
    model = _build(lambda: Sequence("lstm"))
    assert strategy_for(MAML(), model, dict(model.named_parameters()), {}) == "loop"
    _, grads, _ = _meta(model, _sequences(), vectorize=True)
    _, ref_grads, _ = _meta(copy.deepcopy(model), _sequences(), vectorize=False)
    assert_dicts_close(grads, ref_grads)


def _attention_has_double_backward() -> bool:
    q = torch.randn(WAYS, 2, 4, 4, dtype=torch.float64, requires_grad=True)  # the encoder layer's shapes
    try:
        (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
        g.sum().backward()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(_attention_has_double_backward(), reason="this torch differentiates attention twice")
@pytest.mark.parametrize("vectorize", [True, False])
def test_an_operation_without_second_derivative_is_refused_with_the_fix(vectorize: bool) -> None:
    # torch 2.13 has no double backward for scaled_dot_product_attention's CPU flash kernel
    model = _build(lambda: Sequence("transformer"))
    params = dict(model.named_parameters())
    with pytest.raises(ConfigError, match="cannot differentiate twice.*first_order=True"):
        chunk_gradients(MAML(inner_lr=INNER_LR, inner_steps=1), model, params, {}, _sequences(),
                        vectorize=vectorize)
    chunk_gradients(MAML(inner_lr=INNER_LR, inner_steps=1, first_order=True), model, params, {}, _sequences(),
                    vectorize=vectorize)  # first order needs no second derivative


def test_running_statistics_of_buffers_not_passed_update_the_module_as_on_the_loop() -> None:
    model = _build(ZOO["bn2d-running-stats"])
    twin = copy.deepcopy(model)
    for m, vectorize in ((model, True), (twin, False)):  # buffers={}: the module's own are used
        out = meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=2), m, dict(m.named_parameters()), {},
                              _episode(), vectorize=vectorize)
        out.loss.backward()
    assert_dicts_close(dict(model.named_buffers()), dict(twin.named_buffers()))
    assert_dicts_close({k: p.grad for k, p in model.named_parameters()},
                       {k: p.grad for k, p in twin.named_parameters()})


# Networks a user writes from metagrad's layers, with a forward of their own: the batched strategy runs
# them (no registration), exactly; a forward that mixes tasks is caught and runs on vmap instead.

class ResidualOfLayers(nn.Module):
    """A stem, a residual block (3x3 convolutions, a 1x1 shortcut), channels concatenated, then a head of
    a spatial mean and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = ResidualBody()
        self.classifier = nn.Sequential(mg_layers.Linear(10, 8), nn.Tanh(), mg_layers.Linear(8, WAYS))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class ResidualBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = mg_layers.ConvBlock(1, 4)  # (B, 4, 4, 4)
        self.conv1, self.norm1 = mg_layers.Conv2d(4, 6, 3, padding=1), mg_layers.BatchNorm(6)
        self.conv2, self.norm2 = mg_layers.Conv2d(6, 6, 3, padding=1), mg_layers.BatchNorm(6)
        self.shortcut = mg_layers.Conv2d(4, 6, 1)
        self.mean = mg_layers.SpatialMean()

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        r = F.relu(self.norm2(self.conv2(F.relu(self.norm1(self.conv1(h))))) + self.shortcut(h))
        return self.mean(torch.cat([r, h], dim=-3))  # (B, 6 + 4)


class OmniglotCNNChanged(OmniglotCNN):
    """A subclass of a standard network with its own forward: the blocks run by hand, the body's output
    flattened by the tensor method and squashed before the head."""

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for block in self.features[:-1]:
            h = block(h)
        return self.classifier(torch.tanh(h.flatten(-3)))  # 1x1 maps on 8x8 images: (B, hidden)


class MixesTasks(nn.Module):
    """metagrad's layers, but a forward that folds everything after the first dimension: batched, the
    first dimension is the tasks', so this would mix the images of a task (and fails on shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(mg_layers.Conv2d(1, 2, 3, padding=1), mg_layers.BatchNorm(2), nn.ReLU())
        self.classifier = mg_layers.Linear(2 * 64, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return self.classifier(h.reshape(h.size(0), -1))


class CentersOverDimZero(MixesTasks):
    """Same shapes batched and alone, different values: centering over dimension 0 (the images of a task
    alone, the tasks in a meta-batch). Only the values show it."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = mg_layers.Linear(2, WAYS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x).mean(dim=(-2, -1))
        return self.classifier(h - h.mean(dim=0))


LAYER_MODELS = {
    "residual-of-metagrad-layers": ResidualOfLayers,
    "omniglot-cnn-subclass": lambda: OmniglotCNNChanged(WAYS, hidden_size=4, layers=3),
}


def _reference(model: nn.Module, episode: Episode, *, first_order: bool,
               steps: int = 2) -> tuple[Tensor, dict[str, Tensor]]:
    """MAML's hand-unrolled per-task inner loop (``maml_reference``) on the model's single-task forward."""
    params = dict(model.named_parameters())

    def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (x,))

    loss = torch.stack([reference_task_loss(forward, params, episode.task(i), inner_lr=INNER_LR,
                                            inner_steps=steps, first_order=first_order)
                        for i in range(episode.num_tasks)]).mean()
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", sorted(LAYER_MODELS))
def test_user_network_of_metagrad_layers_runs_batched_and_exactly(name: str, first_order: bool,
                                                                   algorithm: str) -> None:
    model = _build(LAYER_MODELS[name])
    episode = _episode()
    params = dict(model.named_parameters())
    assert strategy_for(make(algorithm), model, params, {}, episode=episode) == "batched"
    loss, grads, _ = _meta(model, episode, vectorize=True, first_order=first_order, algorithm=algorithm)
    if algorithm == "maml":
        ref_loss, ref_grads = _reference(model, episode, first_order=first_order)
    else:  # ANIL runs .features then .classifier, whatever forward says: the per-task loop is its reference
        ref_loss, ref_grads, _ = _meta(model, episode, vectorize=False, first_order=first_order,
                                       algorithm=algorithm)
    assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    assert_dicts_close(grads, ref_grads)


def test_user_network_of_metagrad_layers_matches_finite_differences() -> None:
    model = _build(ResidualOfLayers)
    episode = _episode(seed=1, tasks=2)
    params = dict(model.named_parameters())
    assert strategy_for(MAML(), model, params, {}, episode=episode) == "batched"
    _, grads, _ = _meta(model, episode, vectorize=True)
    direction = {k: torch.randn_like(p) for k, p in params.items()}
    h = 1e-6

    def meta_loss(sign: float) -> float:
        moved = {k: p.detach() + sign * h * direction[k] for k, p in params.items()}
        with torch.no_grad():
            return meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=2), model, moved, {}, episode,
                                   vectorize=False).loss.item()

    predicted = sum((grads[k] * direction[k]).sum() for k in params).item()
    assert (meta_loss(1.0) - meta_loss(-1.0)) / (2 * h) == pytest.approx(predicted, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("factory, why", [
    (MixesTasks, "fails on a meta-batch"),
    (CentersOverDimZero, "differs from each task run alone"),
])
def test_a_forward_that_mixes_tasks_runs_on_vmap_exactly(factory, why: str, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies, "_LOGGED", set())
    model = _build(factory)
    episode = _episode()
    params = dict(model.named_parameters())
    assert strategy_for(MAML(), model, params, {}) == "batched"  # by its layers, before its forward is seen
    with caplog.at_level(logging.INFO, logger="metagrad"):
        loss, grads, _ = _meta(model, episode, vectorize=True)
        assert strategy_for(MAML(), model, params, {}, episode=episode) == "vmap"  # the verdict is kept
    lines = [r.getMessage() for r in caplog.records if "strategy" in r.getMessage()]
    assert len(lines) == 1 and "vmap strategy" in lines[0] and why in lines[0], lines
    for first_order in (False, True):
        if first_order:
            loss, grads, _ = _meta(model, episode, vectorize=True, first_order=True)
        ref_loss, ref_grads = _reference(model, episode, first_order=first_order)
        assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        assert_dicts_close(grads, ref_grads)


def test_the_check_leaves_dropout_and_train_mode_as_they_were() -> None:
    model = _build(lambda: nn.Sequential(mg_layers.Flatten(), mg_layers.Linear(64, 16), nn.ReLU(),
                                         nn.Dropout(0.5), mg_layers.Linear(16, WAYS)))
    episode = _episode()
    # Dropout in train mode draws other masks batched than task by task: the check runs it in eval mode.
    assert strategy_for(MAML(), model, dict(model.named_parameters()), {}, episode=episode) == "batched"
    assert all(m.training for m in model.modules())
    one = _episode(tasks=1)
    same = Episode(*(t.expand(4, *t.shape[1:])
                     for t in (one.support_x, one.support_y, one.query_x, one.query_y)))
    maml = MAML(inner_lr=INNER_LR, inner_steps=1)
    out = meta_batch_loss(maml, model, dict(model.named_parameters()), {}, same)
    assert out.task_losses.unique().numel() == 4  # batched, each task still draws its own masks
