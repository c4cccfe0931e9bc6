"""MAML++'s per-step BatchNorm weights and biases (BNWB), alone and with LSLR and MSL, on every strategy:
against a hand-unrolled per-task float64 reference and central finite differences. Every copy gets the
meta-gradient it should, and none is adapted in the inner loop."""

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
    ANIL,
    MAML,
    STRATEGIES,
    chunk_gradients,
    evaluate_with_losses,
    task_objectives,
)
from metagrad.errors import ConfigError
from metagrad.models import OmniglotCNN
from metagrad.per_step import adapted_keys, at_step, copy_name, per_step_bn_params, per_step_copies
from metagrad.types import Episode

STEPS = 2
MSL_WEIGHTS = [0.3, 0.7]
MODELS = {"omniglot-cnn": (lambda: OmniglotCNN(3, hidden_size=6), (1, 28, 28)),
          "user-bn": (lambda: ConvBN(track_running_stats=False), (1, 8, 8))}


def _problem(model_name: str) -> tuple[nn.Module, dict[str, Tensor], Episode]:
    """A float64 model with BNWB parameters whose copies differ from step to step, and 3 tasks."""
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = factory().double()
    params = per_step_bn_params(model, dict(model.named_parameters()), steps=STEPS)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # copies start equal; make each step's its own so that a mix-up shows
        for keys in per_step_copies(params).values():
            for key in keys:
                params[key].add_(0.3 * torch.randn(params[key].shape, generator=g, dtype=torch.float64))
    return model, params, random_episode(3, 3, 1, 2, shape, seed=0)


def _lslr(params: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """LSLR rates for the adapted (non-BatchNorm) parameters, one scalar per tensor and step."""
    names = adapted_keys(params, None) or []
    return [{k: torch.tensor(0.1 + 0.05 * (i + s), dtype=torch.float64, requires_grad=True)
             for i, k in enumerate(names)} for s in range(STEPS)]


def _reference(model: nn.Module, params: dict[str, Tensor], lr: object, episode: Episode, first_order: bool,
               step_weights: list[float] | None, steps: int = STEPS, head_only: bool = False) -> Tensor:
    """Mean query loss, unrolled by hand one task at a time: step k's forwards (support, and query after
    step k) take copy min(k, S-1) of each BatchNorm weight and bias; only the other tensors adapt (with
    ``head_only``, ANIL's, only the head's)."""
    copies = per_step_copies(params)
    names = [k for k in params if "@" not in k]
    adapted = [k for k in names if k.startswith("classifier.")] if head_only else names

    def bn(step: int) -> dict[str, Tensor]:
        return {name: params[keys[min(step, len(keys) - 1)]] for name, keys in copies.items()}

    total = 0.0
    for sx, sy, qx, qy in (episode.task(i) for i in range(episode.num_tasks)):
        fast = {k: params[k] for k in names}
        for step in range(steps):
            loss = F.cross_entropy(functional_call(model, {**fast, **bn(step)}, (sx,)), sy)
            grads = torch.autograd.grad(loss, [fast[k] for k in adapted], create_graph=not first_order)
            rate = lr[step] if isinstance(lr, list) else {k: lr for k in names}
            fast = {**fast, **{k: fast[k] - rate[k] * g for k, g in zip(adapted, grads)}}
            if step_weights is not None:
                query = F.cross_entropy(functional_call(model, {**fast, **bn(step)}, (qx,)), qy)
                total = total + step_weights[step] * query
        if step_weights is None:
            total = total + F.cross_entropy(functional_call(model, {**fast, **bn(steps - 1)}, (qx,)), qy)
    return total / episode.num_tasks


def _leaves(lr: object) -> list[Tensor]:
    return [t for d in lr for t in d.values()] if isinstance(lr, list) else []


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("options", ["bnwb", "bnwb+lslr+msl"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_per_step_bn_on_every_strategy(model_name: str, options: str, first_order: bool) -> None:
    model, params, episode = _problem(model_name)
    lr = _lslr(params) if "lslr" in options else 0.3
    step_weights = MSL_WEIGHTS if "msl" in options else None
    expected = _reference(model, params, lr, episode, first_order, step_weights)
    wrt = [*params.values(), *_leaves(lr)]
    expected_grads = torch.autograd.grad(expected, wrt, allow_unused=True)
    expected_grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, expected_grads)]
    scale = max(g.abs().max().item() for g in expected_grads)
    # Which copies the meta-gradient reaches: every one through the second-order terms or MSL's query
    # losses; first order with the last step's loss alone, only the last (the query forward's).
    copies = per_step_copies(params)
    for name, keys in copies.items():
        for step, key in enumerate(keys):
            reached = not first_order or step_weights is not None or step == STEPS - 1
            assert bool(expected_grads[list(params).index(key)].any()) == reached, (key, reached)
    strategies = STRATEGIES if model_name == "omniglot-cnn" else ("vmap", "loop")
    maml = MAML(inner_lr=lr, inner_steps=STEPS, first_order=first_order, step_weights=step_weights)
    for strategy in strategies:
        _, losses, _ = task_objectives(maml, model, params, {}, episode, strategy=strategy)
        assert_close(losses.mean(), expected, rtol=1e-10, atol=0, msg=strategy)
        grads = torch.autograd.grad(losses.mean(), wrt, allow_unused=True)
        for name, g, e in zip([*params, *range(len(_leaves(lr)))], grads, expected_grads):
            g = torch.zeros_like(e) if g is None else g
            assert_close(g, e, rtol=1e-7, atol=1e-10 * scale, msg=f"{strategy} {name}")


@pytest.mark.parametrize("options", ["bnwb", "bnwb+lslr+msl"])
@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "loop"])
def test_per_step_bn_meta_gradient_matches_finite_differences(vectorize: bool, options: str) -> None:
    # Second order through the training loop's path (chunk_gradients: parameters, copies, then rates);
    # the reference is independent of autograd: central differences along a random direction.
    model, params, episode = _problem("omniglot-cnn")
    lr = _lslr(params) if "lslr" in options else 0.3
    step_weights = MSL_WEIGHTS if "msl" in options else None
    wrt = [*params.values(), *_leaves(lr)]
    maml = MAML(inner_lr=lr, inner_steps=STEPS, step_weights=step_weights)
    _, flat = chunk_gradients(maml, model, params, {}, episode, vectorize=vectorize, max_tasks_per_chunk=2)
    assert flat.numel() == sum(t.numel() for t in wrt)
    direction = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = 1e-7  # small: at 1e-6 some directions already cross a ReLU or max-pool kink (the loss jumps)

    def loss_at(shift: float) -> float:
        with torch.no_grad():
            # requires_grad: the reference differentiates its inner loop
            moved = [(t + shift * d.view_as(t)).requires_grad_()
                     for t, d in zip(wrt, direction.split([t.numel() for t in wrt]))]
        shifted = dict(zip(params, moved[:len(params)]))
        rates = iter(moved[len(params):])
        shifted_lr = [{k: next(rates) for k in step} for step in lr] if isinstance(lr, list) else lr
        return _reference(model, shifted, shifted_lr, episode, False, step_weights).item() * episode.num_tasks

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert numeric == pytest.approx(float(flat @ direction), rel=1e-6)
    # and each copy's own block is reached (not zero)
    blocks = dict(zip(params, flat[:sum(p.numel() for p in params.values())].split(
        [p.numel() for p in params.values()])))
    assert all(blocks[key].abs().sum() > 0 for keys in per_step_copies(params).values() for key in keys)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_test_time_steps_beyond_training_use_the_last_copy(strategy: str) -> None:
    model, params, episode = _problem("omniglot-cnn")
    maml = MAML(inner_lr=0.3, inner_steps=STEPS + 2)
    losses, _ = evaluate_with_losses(maml, model, params, {}, episode, vectorize=strategy != "loop")
    if strategy == "batched":
        expected = _reference(model, params, 0.3, episode, True, None, steps=STEPS + 2)
        per_task = torch.stack([
            _reference(model, params, 0.3, Episode(*(t[i:i + 1] for t in (
                episode.support_x, episode.support_y, episode.query_x, episode.query_y))), True, None,
                steps=STEPS + 2) for i in range(episode.num_tasks)])
        assert_close(losses.mean(), expected, rtol=1e-10, atol=0)
        assert_close(losses, per_task.detach(), rtol=1e-10, atol=0)
    else:
        _, looped, _ = task_objectives(maml.detached(), model, params, {}, episode, strategy=strategy)
        assert_close(losses, looped.detach(), rtol=1e-10, atol=0)


def test_copies_are_named_by_step_and_not_adapted() -> None:
    model = OmniglotCNN(3, hidden_size=6)
    plain = dict(model.named_parameters())
    params = per_step_bn_params(model, plain, steps=3)
    norm = [k for k in plain if ".norm." in k]
    assert norm and set(per_step_copies(params)) == set(norm)
    assert [k for k in params if "@" not in k] == [k for k in plain if k not in norm]
    assert all(torch.equal(params[copy_name(k, s)], plain[k]) and params[copy_name(k, s)] is not plain[k]
               and params[copy_name(k, s)].requires_grad for k in norm for s in range(3))
    assert set(adapted_keys(params, None) or []) == set(plain) - set(norm)
    assert at_step(params, 7)[norm[0]] is params[copy_name(norm[0], 2)]  # beyond training: the last copy
    assert at_step(plain, 1) is plain and adapted_keys(plain, None) is None  # without BNWB: unchanged


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("options", ["bnwb", "bnwb+msl"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_anil_with_per_step_bn_runs_the_whole_forward(model_name: str, options: str,
                                                      first_order: bool) -> None:
    # ANIL beside BNWB: the body's BatchNorm takes each step's copy, so the body runs in every inner step
    # and only the head adapts; every strategy gives the hand-unrolled reference's loss and gradients.
    model, params, episode = _problem(model_name)
    step_weights = MSL_WEIGHTS if "msl" in options else None
    expected = _reference(model, params, 0.3, episode, first_order, step_weights, head_only=True)
    assert not torch.allclose(expected, _reference(model, params, 0.3, episode, first_order, step_weights))
    wrt = list(params.values())
    expected_grads = [torch.zeros_like(t) if g is None else g
                      for t, g in zip(wrt, torch.autograd.grad(expected, wrt, allow_unused=True))]
    scale = max(g.abs().max().item() for g in expected_grads)
    anil = ANIL(inner_lr=0.3, inner_steps=STEPS, first_order=first_order, step_weights=step_weights)
    strategies = STRATEGIES if model_name == "omniglot-cnn" else ("vmap", "loop")
    for strategy in strategies:
        _, losses, _ = task_objectives(anil, model, params, {}, episode, strategy=strategy)
        assert_close(losses.mean(), expected, rtol=1e-10, atol=0, msg=strategy)
        grads = torch.autograd.grad(losses.mean(), wrt, allow_unused=True)
        for name, g, e in zip(params, grads, expected_grads):
            g = torch.zeros_like(e) if g is None else g
            assert_close(g, e, rtol=1e-7, atol=1e-10 * scale, msg=f"{strategy} {name}")
    losses, _ = evaluate_with_losses(anil, model, params, {}, episode, vectorize=False)
    assert_close(losses.mean(), _reference(model, params, 0.3, episode, True, None, head_only=True),
                 rtol=1e-10, atol=0)


def test_bad_uses_are_refused() -> None:
    model = OmniglotCNN(3, hidden_size=6)
    linear = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="no BatchNorm weight or bias"):
        per_step_bn_params(linear, dict(linear.named_parameters()), steps=2)
    with pytest.raises(ConfigError, match="at least 1 inner step"):
        per_step_bn_params(model, dict(model.named_parameters()), steps=0)
