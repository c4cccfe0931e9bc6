"""The task-batched forward of the standard networks equals running each task on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from metagrad.functional import forward_with
from metagrad.models import MiniImagenetCNN, OmniglotCNN, OmniglotFC
from metagrad.models.batched import plan_for, task_batched_body, task_batched_forward

CASES = {
    "omniglot-cnn": (lambda: OmniglotCNN(3, hidden_size=8), (1, 28, 28)),
    "omniglot-cnn-strided": (lambda: OmniglotCNN(3, hidden_size=8, strided=True), (1, 28, 28)),
    "omniglot-fc": (lambda: OmniglotFC(3, input_size=64, sizes=(16, 8)), (1, 8, 8)),
    "mini-imagenet-cnn": (lambda: MiniImagenetCNN(3, hidden_size=4, layers=2), (3, 84, 84)),
}


@pytest.mark.parametrize("per_task", [False, True], ids=["shared", "per-task"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_equals_each_task_alone(name: str, per_task: bool) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory().double()
    plan = plan_for(model)
    assert plan is not None
    tasks = 3
    params = dict(model.named_parameters())
    if per_task:  # a different copy of every parameter per task, as after an inner step
        params = {k: v + 0.1 * torch.randn(tasks, *v.shape, dtype=v.dtype) for k, v in params.items()}
    x = torch.randn(tasks, 4, *shape, dtype=torch.float64) * torch.arange(1, tasks + 1).view(-1, 1, 1, 1, 1)
    logits = task_batched_forward(plan, params, x)
    assert logits.shape == (tasks, 4, 3)
    for t in range(tasks):
        own = {k: v[t] if per_task else v for k, v in params.items()}
        assert_close(logits[t], forward_with(model, own, {}, x[t]))
        features = task_batched_body(plan, own, x[t:t + 1])[0]
        assert_close(features, forward_with(model.features, {k[9:]: v for k, v in own.items()
                                                             if k.startswith("features.")}, {}, x[t]))


def test_unknown_models_have_no_plan() -> None:
    assert plan_for(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is None

    class Sub(OmniglotCNN):
        pass

    assert plan_for(Sub(3)) is None
    model = OmniglotCNN(3, hidden_size=4)
    model.features[1].conv.padding = (0, 0)  # a changed layer is not silently batched
    assert plan_for(model) is None
    model = OmniglotCNN(3, hidden_size=4)
    model.features.append(nn.ReLU())
    assert plan_for(model) is None
