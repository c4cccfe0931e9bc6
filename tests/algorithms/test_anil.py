"""ANIL: the head-only inner loop on features computed once equals MAML restricted to the head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from maml_reference import random_episode
from torch import nn
from torch.testing import assert_close

from metagrad.algorithms import ANIL, STRATEGIES, meta_batch_loss, task_objectives
from metagrad.algorithms.base import split_body_head
from metagrad.errors import ConfigError
from metagrad.functional import adapt, forward_with
from metagrad.models import OmniglotCNN

HEAD = ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_anil_is_maml_on_head_keys(strategy: str, first_order: bool) -> None:
    # ANIL's body runs once per set and the inner loop on the head alone; the reference adapts the head
    # keys through the whole model's forward, one task at a time (functional.adapt).
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    params = dict(model.named_parameters())
    episode = random_episode(2, 3, 2, 1, (1, 28, 28))
    anil = ANIL(inner_lr=0.4, inner_steps=3, first_order=first_order)
    _, ours, accs = task_objectives(anil, model, params, {}, episode, strategy=strategy)
    expected = []
    for sx, sy, qx, qy in (episode.task(i) for i in range(episode.num_tasks)):
        fast = adapt(model, params, {}, sx, sy, inner_lr=0.4, steps=3, first_order=first_order, keys=HEAD)
        expected.append(F.cross_entropy(forward_with(model, fast, {}, qx), qy))
    assert_close(ours, torch.stack(expected))
    for a, b in zip(torch.autograd.grad(ours.sum(), list(params.values())),
                    torch.autograd.grad(sum(expected), list(params.values()))):
        assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert accs.shape == (episode.num_tasks,)


def test_body_receives_meta_gradients() -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    episode = random_episode(2, 3, 1, 2, (1, 28, 28))
    params = dict(model.named_parameters())
    out = meta_batch_loss(ANIL(inner_lr=0.4, inner_steps=1), model, params, {}, episode)
    out.loss.backward()
    for name, p in model.named_parameters():
        if not name.endswith("conv.bias"):  # conv biases before BatchNorm cancel out
            assert p.grad.abs().max() > 0, name


def test_split_body_head() -> None:
    model = OmniglotCNN(3, hidden_size=8)
    params = dict(model.named_parameters())
    body, head = split_body_head(model, params)  # under the model's names
    assert sorted(head) == HEAD[::-1] and "features.0.conv.weight" in body
    assert {**body, **head} == params and not body.keys() & head.keys()
    with pytest.raises(ConfigError, match="neither"):
        split_body_head(model, {**dict(model.named_parameters()), "extra": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"\.features \(body\) and \.classifier \(head\) submodules"):
        split_body_head(nn.Linear(2, 2), {})
