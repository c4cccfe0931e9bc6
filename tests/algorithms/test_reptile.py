"""Reptile: the meta-gradient is the parameter difference theta - phi after k inner steps of SGD or Adam
on mini-batches of each task's support set; checked against a hand-written float64 reference
(maml_reference.py's networks, no metagrad code) on every strategy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from maml_reference import random_episode, reference_forward
from torch.testing import assert_close

from metagrad.algorithms import STRATEGIES, make, meta_batch_loss, meta_train_step, task_objectives
from metagrad.algorithms.reptile import ADAM_BETA2, ADAM_EPS, Reptile
from metagrad.errors import ConfigError
from metagrad.models import OmniglotCNN
from metagrad.training.config import MetaConfig
from metagrad.training.schedule import learning_rate


def reference_reptile_direction(model, params, episode, *, lr, steps, batch, adam):
    """sum over tasks of (theta - phi_t), phi_t after ``steps`` steps on class-interleaved batches."""
    forward = reference_forward(model)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(episode.num_tasks):
        sx, sy = episode.support_x[t], episode.support_y[t]
        n = sx.shape[0]
        ways = int(sy.max()) + 1
        shots = n // ways
        order = [c * shots + s for s in range(shots) for c in range(ways)]  # classes in turn
        phi = {k: v.detach().clone() for k, v in params.items()}
        second = {}
        for step in range(steps):
            idx = [order[(i + step * batch) % n] for i in range(batch)] if batch else list(range(n))
            leaves = {k: v.requires_grad_() for k, v in {k: v.detach() for k, v in phi.items()}.items()}
            loss = F.cross_entropy(forward(leaves, sx[idx]), sy[idx])
            grads = torch.autograd.grad(loss, list(leaves.values()))
            for (k, v), g in zip(leaves.items(), grads):
                if adam:
                    second[k] = ADAM_BETA2 * second[k] + (1 - ADAM_BETA2) * g * g if k in second else (
                        (1 - ADAM_BETA2) * g * g)
                    step_lr = lr * math.sqrt(1 - ADAM_BETA2 ** (step + 1))
                    phi[k] = v.detach() - step_lr * g / (second[k].sqrt() + ADAM_EPS)
                else:
                    phi[k] = v.detach() - lr * g
        for k in total:
            total[k] += params[k].detach() - phi[k]
    return total


@pytest.mark.parametrize("adam", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reptile_direction_equals_the_reference(strategy: str, adam: bool) -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=4).double()
    params = dict(model.named_parameters())
    episode = random_episode(3, 3, 4, 1, (1, 28, 28), seed=2)  # 12 support samples, batches of 5
    algorithm = make("reptile", inner_lr=0.01 if adam else 0.3, inner_steps=4, inner_batch_size=5,
                     inner_optimizer="adam" if adam else "sgd")
    objective, _, _ = task_objectives(algorithm, model, params, {}, episode, strategy=strategy)
    ours = torch.autograd.grad(objective.sum(), list(params.values()))
    expected = reference_reptile_direction(model, params, episode, lr=algorithm.inner_lr, steps=4, batch=5,
                                           adam=adam)
    for (name, want), got in zip(expected.items(), ours):
        # Adam divides by the root mean square: elements whose gradient is near 0 amplify rounding
        assert_close(got, want, rtol=1e-6 if adam else 1e-9, atol=1e-9 if adam else 1e-12, msg=name)


def test_reptile_scores_the_query_after_adaptation_with_the_whole_support_set() -> None:
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=4).double()
    params = dict(model.named_parameters())
    episode = random_episode(2, 3, 1, 2, (1, 28, 28))
    forward = reference_forward(model)
    out = meta_batch_loss(Reptile(inner_lr=0.2, inner_steps=2, inner_optimizer="sgd"), model, params, {},
                          episode)
    expected = []
    for sx, sy, qx, qy in (episode.task(i) for i in range(episode.num_tasks)):
        fast = {k: v.detach() for k, v in params.items()}
        for _ in range(2):
            leaves = {k: v.clone().requires_grad_() for k, v in fast.items()}
            grads = torch.autograd.grad(F.cross_entropy(forward(leaves, sx), sy), list(leaves.values()))
            fast = {k: v.detach() - 0.2 * g for (k, v), g in zip(leaves.items(), grads)}
        expected.append(F.cross_entropy(forward(fast, qx), qy))
    assert_close(out.task_losses, torch.stack(expected))


def test_an_sgd_outer_step_moves_the_initialization_toward_the_adapted_weights() -> None:
    # theta <- theta + epsilon * (mean phi - theta): SGD at rate epsilon on the engine's meta-gradient
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=4).double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    episode = random_episode(3, 3, 2, 1, (1, 28, 28))
    algorithm = Reptile(inner_lr=0.1, inner_steps=3, inner_optimizer="sgd")
    expected = reference_reptile_direction(model, dict(model.named_parameters()), episode, lr=0.1, steps=3,
                                           batch=0, adam=False)
    meta_train_step(algorithm, model, torch.optim.SGD(model.parameters(), lr=0.5), episode)
    for name, p in model.named_parameters():
        assert_close(p.detach(), before[name] - 0.5 * expected[name] / 3, rtol=1e-9, atol=1e-12, msg=name)


def test_reptile_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigError, match="inner_optimizer"):
        Reptile(inner_optimizer="rmsprop")
    with pytest.raises(ConfigError, match="inner_batch_size"):
        Reptile(inner_batch_size=-1)
    with pytest.raises(ConfigError, match="cannot learn rates"):
        Reptile(inner_lr={"w": torch.ones(1, requires_grad=True)})
    assert Reptile(first_order=False).first_order  # first order by construction


def test_linear_schedule_anneals_as_the_reptile_code() -> None:
    # the code: frac_done = i / meta_iters; step = frac_done * final + (1 - frac_done) * initial
    meta = MetaConfig(algorithm="reptile", meta_lr=1.0, min_meta_lr=0.0, lr_schedule="linear", iterations=100)
    assert [learning_rate(meta, i) for i in (1, 51, 100)] == pytest.approx([1.0, 0.5, 0.01])
