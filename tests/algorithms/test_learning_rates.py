"""Inner learning rates per parameter (Meta-SGD) and per layer per step (MAML++'s LSLR) on every strategy,
against a hand-unrolled per-task reference in float64; the rates get their meta-gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from maml_reference import random_episode
from test_user_models import ConvBN
from torch import Tensor, nn
from torch.func import functional_call
from torch.testing import assert_close

from metagrad.algorithms import (
    MAML,
    STRATEGIES,
    chunk_gradients,
    evaluate_with_losses,
    lslr_rates,
    make,
    meta_batch_loss,
    meta_rates,
    meta_sgd_rates,
    meta_train_step,
    task_objectives,
)
from metagrad.errors import ConfigError
from metagrad.functional import learned_rates
from metagrad.models import OmniglotCNN
from metagrad.types import Episode

STEPS = 2


def _per_parameter(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta-SGD: a rate of each parameter's shape, here drawn around 0.3 so that each element differs."""
    g = torch.Generator().manual_seed(1)
    return {k: (0.2 + 0.2 * torch.rand(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
            for k, p in params.items()}


def _per_layer_per_step(params: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """MAML++'s LSLR: one scalar per parameter tensor and inner step."""
    return [{k: torch.tensor(0.1 + 0.05 * (i + s), dtype=torch.float64, requires_grad=True)
             for i, k in enumerate(params)} for s in range(STEPS)]


def _rate(lr: object, step: int, name: str) -> Tensor:
    lr = lr[step] if isinstance(lr, list) else lr
    return lr if isinstance(lr, float) else lr[name]


def _reference(model: nn.Module, params: dict[str, Tensor], lr: object, episode: Episode, first_order: bool,
               keys: list[str], step_weights: list[float] | None = None) -> Tensor:
    """Mean query loss of MAML adapting ``keys``, unrolled by hand one task at a time; with
    ``step_weights``, MAML++'s multi-step loss (the weighted query losses after every step)."""
    total = 0.0
    for sx, sy, qx, qy in (episode.task(i) for i in range(episode.num_tasks)):
        fast = dict(params)
        for step in range(STEPS):
            loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
            fast = {**fast, **{k: fast[k] - _rate(lr, step, k) * g for k, g in zip(keys, grads)}}
            if step_weights is not None:
                total = total + step_weights[step] * F.cross_entropy(functional_call(model, fast, (qx,)), qy)
        if step_weights is None:
            total = total + F.cross_entropy(functional_call(model, fast, (qx,)), qy)
    return total / episode.num_tasks


def _leaves(lr: object) -> list[Tensor]:
    return [t for d in (lr if isinstance(lr, list) else [lr]) if isinstance(d, dict) for t in d.values()]


def _problem(model_name: str, kind: str) -> tuple[nn.Module, dict[str, Tensor], object, Episode]:
    """A float64 model of ``MODELS``, its parameters, learned rates of ``kind`` and 3 tasks."""
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = factory().double()
    params = dict(model.named_parameters())
    rates = {"per-parameter": _per_parameter, "per-layer-per-step": _per_layer_per_step,
             "number": lambda _: 0.3}
    return model, params, rates[kind](params), random_episode(3, 3, 1, 2, shape, seed=0)


MODELS = {"omniglot-cnn": (lambda: OmniglotCNN(3, hidden_size=6), (1, 28, 28)),
          "user-bn": (lambda: ConvBN(track_running_stats=False), (1, 8, 8))}


MSL_WEIGHTS = [0.3, 0.7]
"""MAML++'s multi-step loss weights for the ``STEPS`` inner steps."""


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("step_weights", [None, MSL_WEIGHTS], ids=["last-step", "msl"])
@pytest.mark.parametrize("kind", ["number", "per-parameter", "per-layer-per-step"])
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_learned_rates_and_multi_step_loss_on_every_strategy(
    model_name: str, algorithm: str, kind: str, step_weights: list[float] | None, first_order: bool
) -> None:
    model, params, lr, episode = _problem(model_name, kind)
    keys = [k for k in params if k.startswith("classifier.")] if algorithm == "anil" else list(params)
    expected = _reference(model, params, lr, episode, first_order, keys, step_weights)
    if step_weights is not None:  # MSL computes another loss than the last step's
        assert not torch.allclose(expected, _reference(model, params, lr, episode, first_order, keys))
    wrt = [*params.values(), *_leaves(lr)]
    expected_grads = torch.autograd.grad(expected, wrt, allow_unused=True)
    scale = max(g.abs().max().item() for g in expected_grads if g is not None)
    strategies = STRATEGIES if model_name == "omniglot-cnn" else ("vmap", "loop")
    learner = make(algorithm, inner_lr=lr, inner_steps=STEPS, first_order=first_order,
                   step_weights=step_weights)
    for strategy in strategies:
        _, losses, _ = task_objectives(learner, model, params, {}, episode, strategy=strategy)
        assert_close(losses.mean(), expected, rtol=1e-10, atol=0, msg=strategy)
        grads = torch.autograd.grad(losses.mean(), wrt, allow_unused=True)
        for g, e in zip(grads, expected_grads):
            if e is None:  # a rate ANIL never uses (the body's)
                assert g is None or not g.any(), strategy
                continue
            assert_close(g, e, rtol=1e-7, atol=1e-10 * scale, msg=strategy)


def test_rates_receive_meta_gradients() -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=6).double()
    params = dict(model.named_parameters())
    lr = _per_parameter(params)
    out = meta_batch_loss(MAML(inner_lr=lr, inner_steps=1), model, params, {},
                          random_episode(2, 3, 1, 1, (1, 28, 28), seed=0))
    out.loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for k, t in lr.items() if "weight" in k)


def test_too_few_per_step_rates_are_refused() -> None:
    with pytest.raises(ConfigError, match="2 per-step learning rates for 3 inner steps"):
        MAML(inner_lr=[0.1, 0.2], inner_steps=3)
    with pytest.raises(ConfigError, match="finite non-negative"):
        MAML(inner_lr=[0.1, -0.2], inner_steps=2)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("kind", ["per-parameter", "per-layer-per-step"])
@pytest.mark.parametrize("vectorize,chunk", [(True, None), (True, 1), (False, None)],
                         ids=["vectorized", "one-task-chunks", "loop"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_chunk_gradients_return_the_rates_meta_gradient(model_name: str, vectorize: bool, chunk: int | None,
                                                        kind: str, first_order: bool) -> None:
    # The training loop's path: the flat sum gradient holds the parameters' then the learned rates'.
    model, params, lr, episode = _problem(model_name, kind)
    expected = _reference(model, params, lr, episode, first_order, list(params)) * episode.num_tasks
    wrt = [*params.values(), *_leaves(lr)]
    expected_flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(expected, wrt)])
    maml = MAML(inner_lr=lr, inner_steps=STEPS, first_order=first_order)
    out, flat = chunk_gradients(maml, model, params, {}, episode, vectorize=vectorize,
                                max_tasks_per_chunk=chunk)
    assert list(meta_rates(lr)) == [f"inner_lr.{k}" for k in learned_rates(lr)]
    assert flat.shape == expected_flat.shape
    assert_close(out.loss * episode.num_tasks, expected.detach(), rtol=1e-10, atol=0)
    assert_close(flat, expected_flat, rtol=1e-7, atol=1e-10 * expected_flat.abs().max().item())
    assert flat[-sum(t.numel() for t in _leaves(lr)):].abs().sum() > 0  # the rates get a gradient


def test_meta_train_step_moves_the_rates_with_the_parameters() -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=6).double()
    params = dict(model.named_parameters())
    rates = meta_sgd_rates(params, inner_lr=0.1, low=0.005, generator=torch.Generator().manual_seed(0))
    tensors = [*params.values(), *rates.values()]
    before = [t.detach().clone() for t in tensors]
    optimizer = torch.optim.SGD(tensors, lr=1.0)
    episode = random_episode(2, 3, 1, 1, (1, 28, 28), seed=0)
    maml = MAML(inner_lr=rates, inner_steps=1)
    expected = torch.autograd.grad(meta_batch_loss(maml, model, params, {}, episode).loss, tensors)
    meta_train_step(maml, model, optimizer, episode)
    for tensor, old, g in zip(tensors, before, expected):
        assert_close(tensor.detach(), old - g, rtol=1e-9, atol=1e-12)


def test_meta_sgd_rates_start_as_asked() -> None:
    params = dict(OmniglotCNN(3, hidden_size=6).named_parameters())
    ones = meta_sgd_rates(params, inner_lr=0.4)
    assert all(r.shape == params[k].shape and r.requires_grad and bool((r == 0.4).all())
               for k, r in ones.items())
    drawn = meta_sgd_rates(params, inner_lr=0.1, low=0.005, generator=torch.Generator().manual_seed(0))
    values = torch.cat([r.detach().reshape(-1) for r in drawn.values()])
    assert values.min() >= 0.005 and values.max() < 0.1 and values.std() > 0.02
    again = meta_sgd_rates(params, inner_lr=0.1, low=0.005, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(again[k], r) for k, r in drawn.items())
    with pytest.raises(ConfigError, match="lower end"):
        meta_sgd_rates(params, inner_lr=0.1, low=0.2)


def test_lslr_rates_start_at_the_inner_rate() -> None:
    params = dict(OmniglotCNN(3, hidden_size=6).double().named_parameters())
    rates = lslr_rates(params, inner_lr=0.1, steps=3)
    assert len(rates) == 3 and all(list(step) == list(params) for step in rates)
    assert all(r.dim() == 0 and r.dtype == torch.float64 and r.requires_grad and r.item() == 0.1
               for step in rates for r in step.values())
    assert len({id(r) for step in rates for r in step.values()}) == 3 * len(params)  # all independent


def test_evaluation_keeps_no_graph_to_learned_rates() -> None:
    model = OmniglotCNN(3, hidden_size=6).double()
    params = dict(model.named_parameters())
    rates = meta_sgd_rates(params, inner_lr=0.1, low=0.005, generator=torch.Generator().manual_seed(0))
    episode = random_episode(2, 3, 1, 1, (1, 28, 28), seed=0)
    maml = MAML(inner_lr=rates, inner_steps=3)
    losses, accs = evaluate_with_losses(maml, model, params, {}, episode)
    assert not losses.requires_grad and not accs.requires_grad
    # The learned rates are used: they change the result from MAML's with one number.
    plain, _ = evaluate_with_losses(maml.replace(inner_lr=0.1), model, params, {}, episode)
    assert not torch.equal(losses, plain)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "loop"])
def test_multi_step_loss_through_chunk_gradients_matches_finite_differences(vectorize: bool) -> None:
    # MSL and LSLR together, second order, through the training loop's path; the reference here is
    # independent of autograd: central differences of the loss along a random direction.
    model, params, lr, episode = _problem("omniglot-cnn", "per-layer-per-step")
    wrt = [*params.values(), *_leaves(lr)]
    maml = MAML(inner_lr=lr, inner_steps=STEPS, step_weights=MSL_WEIGHTS)
    _, flat = chunk_gradients(maml, model, params, {}, episode, vectorize=vectorize, max_tasks_per_chunk=2)
    direction = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = 1e-6

    def loss_at(shift: float) -> float:
        with torch.no_grad():
            moved = [t + shift * d.view_as(t) for t, d in zip(wrt, direction.split([t.numel() for t in wrt]))]
        shifted = dict(zip(params, moved[:len(params)]))
        rates = moved[len(params):]
        shifted_lr = [{k: rates[s * len(params) + i] for i, k in enumerate(params)} for s in range(STEPS)]
        out = meta_batch_loss(MAML(inner_lr=shifted_lr, inner_steps=STEPS, step_weights=MSL_WEIGHTS), model,
                              shifted, {}, episode, vectorize=False)
        return out.loss.item() * episode.num_tasks

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert numeric == pytest.approx(float(flat @ direction), rel=1e-5)


def test_multi_step_loss_weights_must_match_the_steps() -> None:
    with pytest.raises(ConfigError, match="3 multi-step loss weights for 2 inner steps"):
        MAML(inner_lr=0.3, inner_steps=2, step_weights=[0.1, 0.2, 0.7])
