"""BOIL: the body adapts, the head stays frozen in the inner loop; checked against a hand-written float64
reference (maml_reference.py, no metagrad code) on every strategy."""

from __future__ import annotations

import pytest
import torch
from maml_reference import random_episode, reference_meta_gradient
from torch.testing import assert_close

from metagrad.algorithms import STRATEGIES, make, meta_batch_loss, task_objectives
from metagrad.algorithms.boil import BOIL
from metagrad.errors import ConfigError
from metagrad.models import MiniImagenetCNN, OmniglotCNN


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_class", [OmniglotCNN, MiniImagenetCNN])
def test_boil_equals_the_reference_with_a_frozen_head(model_class, strategy: str, first_order: bool) -> None:
    torch.manual_seed(0)
    model = model_class(3, hidden_size=4).double()
    params = dict(model.named_parameters())
    shape = (1, 28, 28) if model_class is OmniglotCNN else (3, 84, 84)
    episode = random_episode(3, 3, 2, 2, shape, seed=1)
    body = [k for k in params if k.startswith("features.")]
    loss, grads = reference_meta_gradient(model, params, episode, inner_lr=0.3, inner_steps=2,
                                          first_order=first_order, keys=body)
    objective, losses, _ = task_objectives(BOIL(inner_lr=0.3, inner_steps=2, first_order=first_order), model,
                                           params, {}, episode, strategy=strategy)
    assert_close(objective.mean(), loss, rtol=1e-10, atol=1e-12)
    assert_close(losses, objective)
    ours = torch.autograd.grad(objective.mean(), list(params.values()))
    for name, a, b in zip(params, ours, grads):
        assert_close(a, b, rtol=1e-7, atol=1e-11, msg=name)


def test_boil_gives_the_head_a_meta_gradient_but_never_adapts_it() -> None:
    # The head's meta-gradient flows through the query loss only; with the inner step at 0 BOIL is the
    # un-adapted network, and a head-only change in lr changes nothing.
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=4).double()
    params = dict(model.named_parameters())
    episode = random_episode(2, 3, 1, 1, (1, 28, 28))
    out = meta_batch_loss(BOIL(inner_lr=0.5, inner_steps=1), model, params, {}, episode)
    head = torch.autograd.grad(out.loss, [params["classifier.weight"]])[0]
    assert head.abs().max() > 0
    rates = {k: (0.5 if k.startswith("features.") else 123.0) for k in params}
    other = meta_batch_loss(BOIL(inner_lr=rates, inner_steps=1), model, params, {}, episode)
    assert_close(other.loss, out.loss)


def test_boil_needs_a_body_and_a_head() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    episode = random_episode(1, 2, 1, 1, (4,))
    with pytest.raises(ConfigError, match="features"):
        meta_batch_loss(make("boil"), model, dict(model.named_parameters()), {}, episode)
