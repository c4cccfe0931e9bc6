"""Users' own models through ``l2l.algorithms.MAML`` (learn2learn's clone/adapt loop) get the same
meta-gradients and running statistics as metagrad's vectorized path, in float64."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import metagrad.compat.learn2learn as l2l

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
from test_user_models import ZOO, _build, _episode, _meta, assert_dicts_close

MODELS = ["bn2d-running-stats", "bn2d-batch-stats", "bn1d-running-stats", "layernorm", "instancenorm-affine",
          "residual", "view-cat", "tied", "unused-parameter", "buffers", "functional-batch-norm"]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", MODELS)
def test_user_model_through_learn2learn_api_matches_vectorized(name: str, first_order: bool) -> None:
    model = _build(ZOO[name])
    twin = copy.deepcopy(model)
    episode = _episode()
    maml = l2l.algorithms.MAML(twin, lr=0.4, first_order=first_order, allow_unused=True)
    total = 0.0
    for i in range(episode.num_tasks):  # learn2learn's examples: a clone per task, adapt, query loss
        support_x, support_y, query_x, query_y = episode.task(i)
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(support_x), support_y))
        total = total + F.cross_entropy(learner(query_x), query_y)
    (total / episode.num_tasks).backward()
    loss, grads, buffers = _meta(model, episode, vectorize=True, first_order=first_order)
    assert_close((total / episode.num_tasks).detach(), loss, rtol=1e-10, atol=0)
    assert_dicts_close({k: p.grad if p.grad is not None else torch.zeros_like(p)
                        for k, p in twin.named_parameters() if p.requires_grad}, grads)
    assert_dicts_close({k: b.clone() for k, b in twin.named_buffers()}, buffers)
