"""Any per-task loss (``loss_fn``): the MAML paper's sinusoid regression (K-shot, mean squared error) on
the fast path against a hand-unrolled per-task reference in float64, the example script, and a custom
classification loss on every strategy."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from maml_reference import random_episode, reference_forward
from torch import Tensor, nn
from torch.testing import assert_close

from metagrad.algorithms import (
    MAML,
    STRATEGIES,
    evaluate_with_losses,
    make,
    meta_batch_loss,
    strategy_for,
    task_objectives,
)
from metagrad.models import OmniglotCNN
from metagrad.types import Episode

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sinusoid.py"
INNER_LR = 0.01


def _sinusoids(tasks: int, shots: int, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.empty(tasks, 1, 1, dtype=torch.float64).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1, dtype=torch.float64).uniform_(0.0, math.pi, generator=g)
    x = torch.empty(tasks, 2 * shots, 1, dtype=torch.float64).uniform_(-5.0, 5.0, generator=g)
    y = amplitude * torch.sin(x - phase)
    return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).double()


def _mlp(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2, w3, b3 = params
    return F.linear(F.relu(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)), w3, b3)


def _reference(params: list[Tensor], episode: Episode, steps: int, first_order: bool) -> tuple[Tensor, ...]:
    """The textbook MAML meta-gradient, one task at a time with torch.autograd.grad."""
    total = 0.0
    for sx, sy, qx, qy in (episode.task(i) for i in range(episode.num_tasks)):
        fast = params
        for _ in range(steps):
            grads = torch.autograd.grad(F.mse_loss(_mlp(fast, sx), sy), fast, create_graph=not first_order)
            fast = [p - INNER_LR * g for p, g in zip(fast, grads)]
        total = total + F.mse_loss(_mlp(fast, qx), qy)
    return torch.autograd.grad(total / episode.num_tasks, params)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("vectorize", [True, False])
def test_sinusoid_meta_gradient_matches_reference(vectorize: bool, steps: int, first_order: bool) -> None:
    model, episode = _model(), _sinusoids(tasks=5, shots=10, seed=0)
    params = dict(model.named_parameters())
    maml = MAML(inner_lr=INNER_LR, inner_steps=steps, first_order=first_order, loss_fn=F.mse_loss)
    assert strategy_for(maml, model, params, {}, vectorize=vectorize) == ("vmap" if vectorize else "loop")
    out = meta_batch_loss(maml, model, params, {}, episode, vectorize=vectorize)
    assert out.task_accs is None  # accuracy means nothing for regression
    grads = torch.autograd.grad(out.loss, list(params.values()))
    expected = _reference(list(params.values()), episode, steps, first_order)
    for g, e in zip(grads, expected):
        assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_evaluation_takes_the_loss_too(vectorize: bool) -> None:
    model, episode = _model(), _sinusoids(tasks=4, shots=5, seed=1)
    params = dict(model.named_parameters())
    maml = MAML(inner_lr=INNER_LR, inner_steps=3, loss_fn=F.mse_loss)
    losses, accs = evaluate_with_losses(maml, model, params, {}, episode, vectorize=vectorize)
    trained = meta_batch_loss(maml, model, params, {}, episode, vectorize=False)
    assert_close(losses, trained.task_losses, rtol=1e-12, atol=0)
    assert accs.isnan().all()


def test_sinusoid_example_learns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--iterations", "200", "--meta-batch-size", "10"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    values = dict(part.rsplit(" ", 1) for part in last.split(", "))
    assert float(values["test_mse_after_10_steps"]) < float(values["test_mse_before_adaptation"])


def _smoothed(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=0.1)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_a_custom_classification_loss_on_every_strategy(algorithm: str) -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    params = dict(model.named_parameters())
    episode = random_episode(3, 3, 1, 2, (1, 28, 28), seed=0)
    smoothed = make(algorithm, inner_lr=0.4, inner_steps=2, loss_fn=_smoothed)
    assert strategy_for(smoothed, model, params, {}) == "batched"
    results = {}
    for strategy in STRATEGIES:
        _, losses, accs = task_objectives(smoothed, model, params, {}, episode, strategy=strategy)
        results[strategy] = (losses, accs, torch.autograd.grad(losses.sum(), list(params.values())))
    for strategy in ("batched", "vmap"):
        assert_close(results[strategy][0], results["loop"][0], rtol=1e-10, atol=0)
        assert_close(results[strategy][1], results["loop"][1])
        for g, e in zip(results[strategy][2], results["loop"][2]):
            assert_close(g, e, rtol=1e-7, atol=1e-12)
    plain = task_objectives(smoothed.replace(loss_fn=None), model, params, {}, episode, strategy="batched")[1]
    assert not torch.allclose(plain, results["batched"][0])  # the loss was used


# --------------------------------------------------------------------------------------------------
# Ignored labels (-100), empty sets and non-scalar losses: one convention on every strategy
# --------------------------------------------------------------------------------------------------

IGNORED = -100
HEAD = ["classifier.weight", "classifier.bias"]


def _partly_ignored() -> tuple[nn.Module, dict[str, Tensor], Episode]:
    """A float64 OmniglotCNN and 3 tasks with a different number of ignored labels in each set: none in
    task 0, one support and two query labels in task 1, two support labels and one query label in task 2."""
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    episode = random_episode(3, 3, 2, 2, (1, 28, 28), seed=4)
    support_y, query_y = episode.support_y.clone(), episode.query_y.clone()
    support_y[1, 2] = support_y[2, 0] = support_y[2, 5] = IGNORED
    query_y[1, 1] = query_y[1, 4] = query_y[2, 3] = IGNORED
    ignoring = Episode(episode.support_x, support_y, episode.query_x, query_y)
    return model, dict(model.named_parameters()), ignoring


def _ignoring_reference(model: nn.Module, params: dict[str, Tensor], episode: Episode, keys: list[str],
                        steps: int) -> tuple[Tensor, Tensor]:
    """(query losses (T,), query accuracies (T,)), unrolled by hand one task at a time with torch's own
    ``F.cross_entropy(ignore_index=-100)``: each set's mean over its labelled samples, every sample in
    the forward (and so in BatchNorm's statistics)."""
    forward = reference_forward(model)
    losses, accs = [], []
    for sx, sy, qx, qy in (episode.task(i) for i in range(episode.num_tasks)):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(forward(fast, sx), sy, ignore_index=IGNORED)
            grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=True)
            fast = {**fast, **{k: fast[k] - 0.4 * g for k, g in zip(keys, grads)}}
        logits = forward(fast, qx)
        losses.append(F.cross_entropy(logits, qy, ignore_index=IGNORED))
        labelled = qy != IGNORED
        accs.append((logits.argmax(dim=-1)[labelled] == qy[labelled]).double().mean())
    return torch.stack(losses), torch.stack(accs)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_ignored_labels_count_in_neither_loss_nor_accuracy_on_every_strategy(algorithm: str) -> None:
    model, params, episode = _partly_ignored()
    keys = HEAD if algorithm == "anil" else list(params)
    expected_losses, expected_accs = _ignoring_reference(model, params, episode, keys, steps=2)
    expected_grads = torch.autograd.grad(expected_losses.sum(), list(params.values()))
    scale = max(g.abs().max().item() for g in expected_grads)
    # the ignored samples matter: scoring them as class 0 instead gives other losses
    as_zero = Episode(episode.support_x, episode.support_y.clamp(min=0), episode.query_x,
                      episode.query_y.clamp(min=0))
    assert not torch.allclose(_ignoring_reference(model, params, as_zero, keys, steps=2)[0], expected_losses)
    learner = make(algorithm, inner_lr=0.4, inner_steps=2)
    for strategy in STRATEGIES:
        objective, losses, accs = task_objectives(learner, model, params, {}, episode, strategy=strategy)
        assert_close(losses, expected_losses, rtol=1e-10, atol=0, msg=strategy)
        assert_close(accs, expected_accs, rtol=0, atol=0, msg=strategy)
        for name, g, e in zip(params, torch.autograd.grad(objective.sum(), list(params.values())),
                              expected_grads):
            assert_close(g, e, rtol=1e-7, atol=1e-10 * scale, msg=f"{strategy} {name}")
    for vectorize in (True, False):  # evaluation and training take the same convention
        losses, accs = evaluate_with_losses(learner, model, params, {}, episode, vectorize=vectorize)
        assert_close(losses, expected_losses.detach(), rtol=1e-10, atol=0)
        assert_close(accs, expected_accs, rtol=0, atol=0)
        out = meta_batch_loss(learner, model, params, {}, episode, vectorize=vectorize)
        assert_close(out.loss, expected_losses.mean(), rtol=1e-10, atol=0)
        assert_close(out.task_accs, expected_accs, rtol=0, atol=0)


def _refusals(algorithm: str, model: nn.Module, params: dict[str, Tensor], episode: Episode,
              **settings: object) -> dict[str, str]:
    """The ValueError of each strategy and public entry point on ``episode``, by where it was raised."""
    learner = make(algorithm, inner_lr=0.4, inner_steps=1, **settings)
    args = (learner, model, params, {}, episode)
    calls = {f"task_objectives/{strategy}": lambda s=strategy: task_objectives(*args, strategy=s)
             for strategy in STRATEGIES}
    for vectorize in (True, False):
        calls[f"meta_batch_loss/{vectorize}"] = lambda v=vectorize: meta_batch_loss(*args, vectorize=v)
        calls[f"evaluate/{vectorize}"] = lambda v=vectorize: evaluate_with_losses(*args, vectorize=v)
    messages = {}
    for where, call in calls.items():
        with pytest.raises(ValueError) as caught:
            call()
        messages[where] = str(caught.value)
    return messages


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
@pytest.mark.parametrize("case, message", [
    ("support all ignored", "every support label of task 1 is the ignore index -100"),
    ("query all ignored", "every query label of task 2 is the ignore index -100"),
    ("empty support", "the support sets are empty"),
    ("empty query", "the query sets are empty"),
])
def test_sets_without_labelled_samples_are_refused_alike_on_every_strategy(algorithm: str, case: str,
                                                                            message: str) -> None:
    model, params, episode = _partly_ignored()
    sx, sy, qx, qy = episode.support_x, episode.support_y.clone(), episode.query_x, episode.query_y.clone()
    if case == "support all ignored":
        sy[1] = IGNORED
    elif case == "query all ignored":
        qy[2] = IGNORED
    elif case == "empty support":
        sx, sy = sx[:, :0], sy[:, :0]
    else:
        qx, qy = qx[:, :0], qy[:, :0]
    messages = _refusals(algorithm, model, params, Episode(sx, sy, qx, qy))
    assert len(set(messages.values())) == 1, messages  # one message, whatever the path
    assert message in next(iter(messages.values()))


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_a_loss_that_is_not_one_scalar_per_task_is_refused_alike_on_every_strategy(algorithm: str) -> None:
    model, params, episode = _partly_ignored()

    def per_sample(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    messages = _refusals(algorithm, model, params, episode, loss_fn=per_sample)
    assert len(set(messages.values())) == 1, messages
    assert "loss_fn must return one scalar per task, got shape (6,)" in next(iter(messages.values()))
    assert "reduction='mean'" in next(iter(messages.values()))
