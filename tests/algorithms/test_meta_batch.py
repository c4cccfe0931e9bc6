"""Meta-gradients of every strategy (batched, vmap, loop) against an independent, hand-unrolled MAML."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from maml_reference import random_episode, reference_meta_gradient
from torch import Tensor, nn
from torch.testing import assert_close

from metagrad.algorithms import (
    ALGORITHMS,
    ANIL,
    MAML,
    STRATEGIES,
    Algorithm,
    MetaBatchOutput,
    chunk_gradients,
    evaluate,
    make,
    meta_batch_loss,
    meta_train_step,
    strategies,
    strategy_for,
    task_objectives,
)
from metagrad.errors import ConfigError, TrainingError
from metagrad.models import HEAD_PREFIX, MiniImagenetCNN, OmniglotCNN, OmniglotFC
from metagrad.types import Episode

INNER_LR = 0.4
HEAD = ["classifier.weight", "classifier.bias"]

VARIANTS = {"anil": ("anil", False), "boil": ("boil", False), "fomaml": ("maml", True),
            "maml": ("maml", False)}
"""Test name -> (algorithm, first_order): those whose meta-gradient is the hand-unrolled MAML's on some keys
(``_reference``), first-order MAML among them. Reptile's surrogate objective has its own tests."""
REFERENCED = tuple(VARIANTS)

# name -> (model factory, image shape, tasks, ways, shots, query shots); small but real model classes.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int, int, int]] = {
    "omniglot-cnn": (lambda: OmniglotCNN(3, hidden_size=16), (1, 28, 28), 3, 3, 1, 2),
    "omniglot-cnn-strided": (lambda: OmniglotCNN(3, hidden_size=16, strided=True), (1, 28, 28), 3, 3, 2, 1),
    "omniglot-fc": (lambda: OmniglotFC(3), (1, 28, 28), 3, 3, 2, 2),
    "mini-imagenet-cnn": (lambda: MiniImagenetCNN(2, hidden_size=8), (3, 84, 84), 2, 2, 1, 2),
}


def _algorithm(name: str, steps: int, first_order: bool = False) -> Algorithm:
    """The algorithm of ``VARIANTS`` (or of the registry) ``name``; first order if either says so."""
    algorithm, always_first_order = VARIANTS.get(name, (name, False))
    first_order = first_order or always_first_order
    return make(algorithm, inner_lr=INNER_LR, inner_steps=steps, first_order=first_order)


def _meta_loss(strategy: str, algorithm: str, model: nn.Module, params: dict[str, Tensor], episode: Episode,
               *, steps: int, first_order: bool = False) -> MetaBatchOutput:
    """``meta_batch_loss`` through an explicit strategy ("batched", "vmap" or "loop")."""
    objective, losses, accs = task_objectives(_algorithm(algorithm, steps, first_order), model, params, {},
                                              episode, strategy=strategy)
    assert_close(objective, losses)  # MAML, ANIL, BOIL: the objective is the query loss
    return MetaBatchOutput(objective.mean(), losses.detach(), accs.detach())


def _setup(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Tensor], Episode]:
    factory, shape, tasks, ways, shots, query_shots = MODELS[name]
    torch.manual_seed(seed)
    model = factory().double()
    episode = random_episode(tasks, ways, shots, query_shots, shape, seed=seed)
    return model, dict(model.named_parameters()), episode


def _reference(algorithm: str, model: nn.Module, params: dict[str, Tensor], episode: Episode, steps: int,
               first_order: bool | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    # ANIL is MAML whose inner loop adapts only the head, BOIL only the body; first-order MAML detaches
    # the inner gradients.
    keys = {"anil": HEAD, "boil": [k for k in params if k not in HEAD]}.get(algorithm)
    return reference_meta_gradient(
        model, params, episode, inner_lr=INNER_LR, inner_steps=steps,
        first_order=bool(first_order) or algorithm == "fomaml", keys=keys,
    )


def _grads(out: MetaBatchOutput, params: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out.loss, list(params.values()))


def assert_grads_close(actual: tuple[Tensor, ...], expected: tuple[Tensor, ...]) -> None:
    # Biases followed by BatchNorm have an exactly-zero gradient, so compare against the overall scale.
    scale = max(g.abs().max().item() for g in expected)
    for a, b in zip(actual, expected):
        assert_close(a, b, rtol=1e-7, atol=1e-10 * scale)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("algorithm", REFERENCED)
@pytest.mark.parametrize("name", ["omniglot-cnn", "omniglot-fc"])
def test_meta_gradient_matches_reference(name: str, algorithm: str, steps: int, strategy: str) -> None:
    model, params, episode = _setup(name)
    out = _meta_loss(strategy, algorithm, model, params, episode, steps=steps)
    loss, expected = _reference(algorithm, model, params, episode, steps)
    assert_close(out.loss.detach(), loss)
    assert out.task_losses.shape == out.task_accs.shape == (episode.num_tasks,)
    assert not out.task_losses.requires_grad and not out.task_accs.requires_grad
    assert_close(out.task_losses.mean(), loss)
    assert_grads_close(_grads(out, params), expected)


@pytest.mark.parametrize("strategy", ["batched", "vmap"])
@pytest.mark.parametrize("algorithm", REFERENCED)
@pytest.mark.parametrize("name", ["omniglot-cnn-strided", "mini-imagenet-cnn"])
def test_meta_gradient_matches_reference_other_models(name: str, algorithm: str, strategy: str) -> None:
    model, params, episode = _setup(name)
    out = _meta_loss(strategy, algorithm, model, params, episode, steps=2)
    loss, expected = _reference(algorithm, model, params, episode, 2)
    assert_close(out.loss.detach(), loss)
    assert_grads_close(_grads(out, params), expected)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("algorithm", REFERENCED)
@pytest.mark.parametrize("name", ["omniglot-cnn-strided", "mini-imagenet-cnn"])
def test_batched_matches_reference(name: str, algorithm: str, steps: int) -> None:
    model, params, episode = _setup(name)
    out = _meta_loss("batched", algorithm, model, params, episode, steps=steps)
    assert_grads_close(_grads(out, params), _reference(algorithm, model, params, episode, steps)[1])


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_batched_in_chunks_of_tasks(algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On CPU the batched strategy splits the meta-batch into cache-sized chunks; force 2 tasks per chunk.
    model, params, episode = _setup("omniglot-cnn")
    per_task = (episode.support_x.shape[1] + episode.query_x.shape[1]) * 16 * 28 * 28
    monkeypatch.setattr(strategies, "CPU_CHUNK_ELEMENTS", 2 * per_task)
    assert strategies.tasks_per_chunk(model, episode) == 2 < episode.num_tasks
    out = _meta_loss("batched", algorithm, model, params, episode, steps=2)
    loss, expected = _reference(algorithm, model, params, episode, 2)
    assert_close(out.loss.detach(), loss)
    assert_grads_close(_grads(out, params), expected)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_meta_train_step_in_chunks_of_tasks(algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, params, episode = _setup("omniglot-cnn")
    # one task per chunk, each back-propagated at once
    monkeypatch.setattr(strategies, "CPU_CHUNK_ELEMENTS", 1)
    before = {k: v.detach().clone() for k, v in params.items()}
    loss, expected = _reference(algorithm, model, params, episode, 2)
    out = meta_train_step(_algorithm(algorithm, 2), model, torch.optim.SGD(model.parameters(), lr=1.0),
                          episode)
    assert_close(out.loss, loss)
    assert out.task_losses.shape == (episode.num_tasks,)
    assert_grads_close(tuple(before[k] - v.detach() for k, v in model.named_parameters()), expected)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_max_tasks_per_chunk_caps_any_strategy(algorithm: str, vectorize: bool) -> None:
    # A user's memory cap: chunks of 2 tasks (the last one shorter), each back-propagated at once.
    model, params, episode = _setup("omniglot-cnn")
    assert episode.num_tasks % 2 == 1
    loss, expected = _reference(algorithm, model, params, episode, 2)
    out, grad_sum = chunk_gradients(_algorithm(algorithm, 2), model, params, {}, episode, vectorize=vectorize,
                                    max_tasks_per_chunk=2)
    assert_close(out.loss, loss)
    flat = grad_sum / episode.num_tasks
    assert_grads_close(tuple(flat.split([p.numel() for p in params.values()])),
                       tuple(e.reshape(-1) for e in expected))
    with pytest.raises(ValueError, match="max_tasks_per_chunk must be at least 1"):
        chunk_gradients(_algorithm(algorithm, 1), model, params, {}, episode, max_tasks_per_chunk=0)


def test_anil_with_different_support_and_query_sizes() -> None:
    # Query sets of another size than the support sets take the batched body in two passes.
    model, params, _ = _setup("omniglot-cnn-strided")
    episode = random_episode(3, 3, 1, 3, (1, 28, 28), seed=2)
    out = _meta_loss("batched", "anil", model, params, episode, steps=2)
    assert_grads_close(_grads(out, params), _reference("anil", model, params, episode, 2)[1])


def test_strategy_choice() -> None:
    model, params, _ = _setup("omniglot-cnn")
    maml, anil = MAML(), ANIL()
    assert strategy_for(maml, model, params, {}) == "batched"
    assert strategy_for(anil, model, params, {}, vectorize=False) == "loop"
    assert strategy_for(maml, model, {k: v for k, v in params.items() if k != "classifier.bias"},
                        {}) == "vmap"
    assert strategy_for(maml, model, params, {"running_mean": torch.zeros(1)}) == "vmap"
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # torch's layers: vmap
    assert strategy_for(maml, other, dict(other.named_parameters()), {}) == "vmap"
    frozen = {k: v.detach() if k == "classifier.bias" else v for k, v in params.items()}
    assert strategy_for(maml, model, frozen, {}) == "vmap"

    class Custom(OmniglotCNN):  # a subclass is built from the same layers: batched, once checked
        pass

    custom = Custom(3)
    assert strategy_for(maml, custom, dict(custom.named_parameters()), {}) == "batched"
    with pytest.raises(ValueError, match="strategy"):
        _meta_loss("compiled", "maml", model, params, random_episode(1, 3, 1, 1, (1, 28, 28)), steps=1)
    with pytest.raises(ValueError, match="batched strategy does not support Sequential"):
        _meta_loss("batched", "maml", other, dict(other.named_parameters()),
                   random_episode(1, 3, 1, 1, (1, 4, 1)), steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", REFERENCED)
@pytest.mark.parametrize("name", ["omniglot-cnn", "mini-imagenet-cnn"])
def test_meta_gradient_full_size_models(name: str, algorithm: str) -> None:
    torch.manual_seed(0)
    model = (OmniglotCNN(5) if name == "omniglot-cnn" else MiniImagenetCNN(5)).double()
    params = dict(model.named_parameters())
    shape = (1, 28, 28) if name == "omniglot-cnn" else (3, 84, 84)
    episode = random_episode(2, 5, 1, 2, shape)
    for strategy in STRATEGIES:
        out = _meta_loss(strategy, algorithm, model, params, episode, steps=3)
        assert_grads_close(_grads(out, params), _reference(algorithm, model, params, episode, 3)[1])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_second_order_matches_finite_differences(algorithm: str, strategy: str) -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=4, layers=2).double()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    episode = random_episode(2, 3, 2, 2, (1, 8, 8), seed=3)

    def loss_at(p: dict[str, Tensor]) -> Tensor:
        return _meta_loss(strategy, algorithm, model, p, episode, steps=2).loss

    grads = torch.autograd.grad(loss_at(params), list(params.values()))
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        with torch.no_grad():
            plus = loss_at({k: v + eps * direction[k] for k, v in params.items()})
            minus = loss_at({k: v - eps * direction[k] for k, v in params.items()})
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, params))
        assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_first_order_differs_from_second_order(algorithm: str, strategy: str) -> None:
    model, params, episode = _setup("omniglot-fc")
    second_out = _meta_loss(strategy, algorithm, model, params, episode, steps=2)
    second = _grads(second_out, params)
    first_out = _meta_loss(strategy, algorithm, model, params, episode, steps=2, first_order=True)
    first = _grads(first_out, params)
    diff = max((a - b).abs().max().item() for a, b in zip(first, second))
    assert diff > 1e-3 * max(g.abs().max().item() for g in second)
    # ... and first order is exactly the computation with detached inner gradients.
    assert_grads_close(first, _reference(algorithm, model, params, episode, 2, first_order=True)[1])


@pytest.mark.parametrize("name", ["omniglot-cnn", "omniglot-fc"])
@pytest.mark.parametrize("algorithm", REFERENCED)
def test_each_task_has_its_own_batch_statistics_and_weights(algorithm: str, name: str) -> None:
    model, params, episode = _setup(name)
    # Replace tasks 1.. by images with very different statistics: task 0 must not notice.
    other = Episode(
        torch.cat([episode.support_x[:1], episode.support_x[1:] * 7 + 3]), episode.support_y,
        torch.cat([episode.query_x[:1], episode.query_x[1:] * 7 + 3]), episode.query_y,
    )
    alone = episode.slice(0, 1)
    for strategy in STRATEGIES:
        outs = [_meta_loss(strategy, algorithm, model, params, ep, steps=2) for ep in (episode, other, alone)]
        assert_close(outs[0].task_losses[0], outs[2].task_losses[0])
        assert_close(outs[1].task_losses[0], outs[2].task_losses[0])
        assert not torch.allclose(outs[0].task_losses[1:], outs[1].task_losses[1:])
        # Adapted weights never leak into the next task: each task equals itself run alone.
        for i in range(1, episode.num_tasks):
            single = _meta_loss(strategy, algorithm, model, params, episode.slice(i, i + 1), steps=2)
            assert_close(outs[0].task_losses[i], single.task_losses[0])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_no_grad_around_the_call_changes_no_number(algorithm: str, strategy: str) -> None:
    # The inner loop takes its gradients whatever the caller's grad mode (e.g. a finite-difference check
    # or a validation pass under torch.no_grad() on parameters that require grad).
    model, params, episode = _setup("omniglot-fc")
    out = _meta_loss(strategy, algorithm, model, params, episode, steps=2)
    with torch.no_grad():
        quiet = _meta_loss(strategy, algorithm, model, params, episode, steps=2)
    assert not quiet.loss.requires_grad
    assert_close(quiet.task_losses, out.task_losses, rtol=1e-12, atol=0)
    assert_close(quiet.task_accs, out.task_accs, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_parameters_untouched(strategy: str) -> None:
    model, params, episode = _setup("omniglot-fc")
    before = {k: v.detach().clone() for k, v in params.items()}
    out = _meta_loss(strategy, "maml", model, params, episode, steps=3)
    out.loss.backward()
    for k, v in model.named_parameters():
        assert v is params[k]
        assert_close(v.detach(), before[k])
        assert v.grad is not None


@pytest.mark.parametrize("name", ["omniglot-fc", "omniglot-cnn-strided"])
@pytest.mark.parametrize("algorithm", REFERENCED)
def test_evaluate(algorithm: str, name: str) -> None:
    model, params, episode = _setup(name)
    for steps in (1, 5):  # test-time steps may differ from training
        out = _meta_loss("loop", algorithm, model, params, episode, steps=steps)
        for vectorize in (True, False):
            accs = evaluate(_algorithm(algorithm, steps), model, params, {}, episode, vectorize=vectorize)
            assert accs.shape == (episode.num_tasks,) and not accs.requires_grad
            assert_close(accs, out.task_accs)
        # evaluate()'s no-grad inner loop, on every strategy (vectorize=True picks "batched" here).
        detached = {k: v.detach() for k, v in params.items()}
        for strategy in STRATEGIES:
            with torch.no_grad():
                detached_algorithm = _algorithm(algorithm, steps).detached()
                _, losses, accs = task_objectives(detached_algorithm, model, detached, {}, episode,
                                                  strategy=strategy)
            assert not losses.requires_grad
            assert_close(losses, out.task_losses)
            assert_close(accs, out.task_accs)
    assert all(p.grad is None for p in model.parameters())


def test_meta_train_step_averages_task_gradients_and_learns() -> None:
    model, params, episode = _setup("omniglot-fc")
    before = {k: v.detach().clone() for k, v in params.items()}
    expected = _reference("maml", model, params, episode, 1)[1]
    maml = MAML(inner_lr=INNER_LR, inner_steps=1)
    meta_train_step(maml, model, torch.optim.SGD(model.parameters(), lr=1.0), episode)
    assert_grads_close(tuple(before[k] - v.detach() for k, v in model.named_parameters()), expected)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [meta_train_step(maml, model, optimizer, episode).loss.item() for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]


def test_meta_train_step_refuses_nan() -> None:
    model, params, episode = _setup("omniglot-fc")
    bad = Episode(episode.support_x * float("nan"), episode.support_y, episode.query_x, episode.query_y)
    before = {k: v.detach().clone() for k, v in params.items()}
    with pytest.raises(TrainingError, match="nan"):
        meta_train_step(MAML(inner_lr=INNER_LR, inner_steps=1), model,
                        torch.optim.SGD(model.parameters(), lr=1.0), bad)
    for k, v in model.named_parameters():
        assert_close(v.detach(), before[k])


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Dropout(0.5))
        self.classifier = nn.Linear(32, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_vmap_draws_different_random_numbers_per_task(algorithm: str) -> None:
    torch.manual_seed(0)
    model = _DropoutNet().double()
    one = random_episode(1, 2, 2, 2, (1, 4, 4))
    tensors = (one.support_x, one.support_y, one.query_x, one.query_y)
    same = Episode(*(t.expand(4, *t.shape[1:]) for t in tensors))  # four copies of one task
    out = meta_batch_loss(_algorithm(algorithm, 1), model, dict(model.named_parameters()), {}, same)
    assert len(set(out.task_losses.tolist())) == 4  # four identical tasks, four dropout masks


def test_errors() -> None:
    model, params, episode = _setup("omniglot-fc")
    with pytest.raises(ConfigError, match="valid algorithms: " + ", ".join(ALGORITHMS)):
        make("mamlpp", inner_lr=INNER_LR, inner_steps=1)
    with pytest.raises(ConfigError, match="inner_steps"):
        MAML(inner_lr=INNER_LR, inner_steps=-1)
    with pytest.raises(ConfigError, match="inner_lr"):
        MAML(inner_lr=float("nan"), inner_steps=1)
    flat = Episode(episode.support_x[0], episode.support_y[0], episode.query_x[0], episode.query_y[0])
    with pytest.raises(ValueError, match="episode"):
        meta_batch_loss(MAML(inner_lr=INNER_LR, inner_steps=1), model, params, {}, flat)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 3)).double()
    anil = ANIL(inner_lr=INNER_LR, inner_steps=1)
    with pytest.raises(ConfigError, match=r"needs a model with \.features \(body\) and \.classifier"):
        meta_batch_loss(anil, plain, dict(plain.named_parameters()), {}, episode)
    assert HEAD_PREFIX == "classifier."


def test_algorithms_are_checked_however_they_are_made() -> None:
    valid = ", ".join(ALGORITHMS)
    with pytest.raises(ConfigError, match=f"unknown algorithm 'mamlpp'; valid algorithms: {valid}"):
        make("mamlpp", inner_lr=INNER_LR, inner_steps=1)
    for cls in ALGORITHMS.values():
        with pytest.raises(ConfigError, match="inner_steps must be >= 0"):
            cls(inner_lr=INNER_LR, inner_steps=-1)
        with pytest.raises(ConfigError, match="inner_lr must be a finite non-negative number"):
            cls(inner_lr=-1.0, inner_steps=1)
        with pytest.raises(ConfigError, match="inner_lr gives 1 per-step learning rates for 2 inner steps"):
            cls(inner_lr=[INNER_LR], inner_steps=2)
        with pytest.raises(ConfigError, match="step_weights gives 1 multi-step loss weights for 2 inner"):
            cls(inner_lr=INNER_LR, inner_steps=2, step_weights=[1.0])
    with pytest.raises(ConfigError, match="inner_steps must be >= 0"):
        make("anil", inner_lr=INNER_LR, inner_steps=-1)
    algorithm = MAML(inner_lr=INNER_LR, inner_steps=2, step_weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match="step_weights gives 2"):
        algorithm.replace(inner_steps=3)
    with pytest.raises(ConfigError, match="inner_lr must be a finite"):
        algorithm.replace(inner_lr=float("inf"))
    assert algorithm.replace(inner_steps=3, step_weights=None).inner_steps == 3
    assert algorithm.inner_steps == 2  # values are frozen: replace makes a new one
    with pytest.raises(AttributeError):
        algorithm.inner_steps = 3  # type: ignore[misc]
    assert not algorithm.first_order and algorithm.replace(first_order=True).first_order
    assert make("maml", inner_lr=INNER_LR, inner_steps=1, first_order=True).first_order
    assert {type(make(name)) for name in ("maml", "anil")} == {MAML, ANIL}
    assert all(cls.name == name for name, cls in ALGORITHMS.items())
    learned = torch.tensor(0.3, requires_grad=True)
    evaluation = ANIL(inner_lr={"classifier.weight": learned}, inner_steps=1, step_weights=[1.0]).detached()
    assert isinstance(evaluation, ANIL) and evaluation.first_order and evaluation.step_weights is None
    assert not evaluation.inner_lr["classifier.weight"].requires_grad
