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
from maml_reference import random_episode
from torch import Tensor, nn
from torch.testing import assert_close

from metagrad.algorithms import evaluate_with_losses, meta_batch_loss
from metagrad.algorithms.meta_batch import STRATEGIES, InnerLoop, _task_losses, strategy_for
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
    assert strategy_for("maml", model, params, {}, vectorize=vectorize) == ("vmap" if vectorize else "loop")
    out = meta_batch_loss("maml", model, params, {}, episode, inner_lr=INNER_LR, inner_steps=steps,
                          first_order=first_order, vectorize=vectorize, loss_fn=F.mse_loss)
    assert out.task_accs is None  # accuracy means nothing for regression
    grads = torch.autograd.grad(out.loss, list(params.values()))
    expected = _reference(list(params.values()), episode, steps, first_order)
    for g, e in zip(grads, expected):
        assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_evaluation_takes_the_loss_too(vectorize: bool) -> None:
    model, episode = _model(), _sinusoids(tasks=4, shots=5, seed=1)
    params = dict(model.named_parameters())
    losses, accs = evaluate_with_losses("maml", model, params, {}, episode, inner_lr=INNER_LR, inner_steps=3,
                                        vectorize=vectorize, loss_fn=F.mse_loss)
    trained = meta_batch_loss("maml", model, params, {}, episode, inner_lr=INNER_LR, inner_steps=3,
                              vectorize=False, loss_fn=F.mse_loss)
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
    assert strategy_for(algorithm, model, params, {}) == "batched"
    results = {}
    smoothed = InnerLoop(algorithm, inner_lr=0.4, inner_steps=2, loss_fn=_smoothed)
    for strategy in STRATEGIES:
        losses, accs = _task_losses(smoothed, model, params, {}, episode, strategy=strategy)
        results[strategy] = (losses, accs, torch.autograd.grad(losses.sum(), list(params.values())))
    for strategy in ("batched", "vmap"):
        assert_close(results[strategy][0], results["loop"][0], rtol=1e-10, atol=0)
        assert_close(results[strategy][1], results["loop"][1])
        for g, e in zip(results[strategy][2], results["loop"][2]):
            assert_close(g, e, rtol=1e-7, atol=1e-12)
    plain, _ = _task_losses(InnerLoop(algorithm, inner_lr=0.4, inner_steps=2), model, params, {}, episode,
                            strategy="batched")
    assert not torch.allclose(plain, results["batched"][0])  # the loss was used
