"""ANIL: the head-only inner loop on features computed once equals MAML restricted to the head."""

from __future__ import annotations

import pytest
import torch
from maml_reference import random_episode
from torch import nn
from torch.testing import assert_close

from metagrad.algorithms import InnerLoop, anil_task_loss, maml_task_loss, meta_batch_loss
from metagrad.algorithms.anil import split_body_head
from metagrad.errors import ConfigError
from metagrad.models import OmniglotCNN

HEAD = ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("under_vmap", [False, True])
def test_anil_is_maml_on_head_keys(under_vmap: bool, first_order: bool) -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    params = dict(model.named_parameters())
    episode = random_episode(2, 3, 2, 1, (1, 28, 28))
    loop = InnerLoop("anil", inner_lr=0.4, inner_steps=3, first_order=first_order)

    def anil(*task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return anil_task_loss(model, params, {}, *task, loop, under_vmap=under_vmap)

    def maml_head(*task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return maml_task_loss(model, params, {}, *task, loop, keys=HEAD, under_vmap=under_vmap)

    tasks = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
    if under_vmap:
        ours, expected = torch.func.vmap(anil)(*tasks), torch.func.vmap(maml_head)(*tasks)
    else:
        ours, expected = (tuple(torch.stack(v) for v in zip(*(f(*episode.task(i)) for i in range(2))))
                          for f in (anil, maml_head))
    assert_close(ours, expected)
    for a, b in zip(torch.autograd.grad(ours[0].sum(), list(params.values())),
                    torch.autograd.grad(expected[0].sum(), list(params.values()))):
        assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_body_receives_meta_gradients() -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    episode = random_episode(2, 3, 1, 2, (1, 28, 28))
    params = dict(model.named_parameters())
    out = meta_batch_loss("anil", model, params, {}, episode, inner_lr=0.4, inner_steps=1)
    out.loss.backward()
    for name, p in model.named_parameters():
        if not name.endswith("conv.bias"):  # conv biases before BatchNorm cancel out
            assert p.grad.abs().max() > 0, name


def test_split_body_head() -> None:
    model = OmniglotCNN(3, hidden_size=8)
    body, head = split_body_head(model, dict(model.named_parameters()))
    assert sorted(head) == ["bias", "weight"] and "0.conv.weight" in body
    with pytest.raises(ConfigError, match="neither"):
        split_body_head(model, {**dict(model.named_parameters()), "extra": torch.zeros(1)})
    with pytest.raises(ConfigError, match="features and .classifier"):
        split_body_head(nn.Linear(2, 2), {})
