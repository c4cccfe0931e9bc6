"""The pure core: forward_with, inner_step and adapt against hand-unrolled autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from metagrad.functional import (
    IGNORE_INDEX,
    adapt,
    forward_with,
    inner_loop,
    inner_step,
    sgd_step,
    task_accuracies,
    task_losses,
)
from metagrad.models import OmniglotFC
from metagrad.types import Params


def _model() -> OmniglotFC:
    torch.manual_seed(0)
    return OmniglotFC(3, input_size=16, sizes=(8, 6)).double()


def _task(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat_interleave(2)


def _by_hand(model: OmniglotFC, params: Params, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int,
             first_order: bool) -> Params:
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(torch.func.functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        if first_order:
            grads = tuple(g.detach() for g in grads)
        fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
    return fast


def test_forward_with_uses_the_given_params() -> None:
    model = _model()
    x, _ = _task()
    params = dict(model.named_parameters())
    assert_close(forward_with(model, params, {}, x), model(x))
    doubled = {k: 2 * v for k, v in params.items()}
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2)
    assert_close(forward_with(model, doubled, {}, x), other(x))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_adapt_matches_unrolled_autograd(first_order: bool, steps: int) -> None:
    model = _model()
    params = dict(model.named_parameters())
    x, y = _task()
    ours = adapt(model, params, {}, x, y, inner_lr=0.5, steps=steps, first_order=first_order)
    expected = _by_hand(model, params, x, y, lr=0.5, steps=steps, first_order=first_order)
    assert ours.keys() == params.keys()
    for k in params:
        assert_close(ours[k], expected[k])
    # Same meta-gradient of a function of the adapted parameters.
    qx, qy = _task(seed=2)
    meta = [torch.autograd.grad(F.cross_entropy(forward_with(model, fast, {}, qx), qy), list(params.values()))
            for fast in (ours, expected)]
    for a, b in zip(*meta):
        assert_close(a, b)


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_loop_adapts_each_task_as_adapt_does(first_order: bool) -> None:
    # inner_loop over T tasks with a vmapped forward: each task gets its own copy of the adapted names,
    # the same as adapt on that task alone, and the same meta-gradient.
    model = _model()
    params = dict(model.named_parameters())
    xs = torch.stack([_task(s)[0] for s in range(3)])  # (T, B, C, H, W)
    ys = torch.stack([_task(s)[1] for s in range(3)])
    qx, qy = _task(seed=9)
    head = ["classifier.weight", "classifier.bias"]

    def forward(current: Params, x: torch.Tensor, tasked: frozenset[str]) -> torch.Tensor:
        shared = {k: v for k, v in current.items() if k not in tasked}
        return torch.func.vmap(lambda own, task_x: forward_with(model, {**shared, **own}, {}, task_x))(
            {k: current[k] for k in tasked}, x)

    seen: list[tuple[int, Params]] = []
    for keys in (None, head):
        seen.clear()
        fast, tasked = inner_loop(forward, params, xs, ys, lr=0.5, steps=2, keys=keys,
                                  first_order=first_order, on_step=lambda step, p, t: seen.append((step, p)))
        assert tasked == frozenset(keys or params) and fast.keys() == params.keys()
        assert all(fast[k] is params[k] for k in params if k not in tasked)
        assert [step for step, _ in seen] == [0, 1] and seen[-1][1] is not None
        assert all(torch.equal(seen[-1][1][k], fast[k]) for k in fast)
        per_task = [adapt(model, params, {}, x, y, inner_lr=0.5, steps=2, first_order=first_order, keys=keys)
                    for x, y in zip(xs, ys)]
        for k in tasked:
            assert fast[k].shape == (3, *params[k].shape)
            assert_close(fast[k], torch.stack([one[k] for one in per_task]))
        task_params = [{k: v[t] if k in tasked else v for k, v in fast.items()} for t in range(3)]
        batched = [F.cross_entropy(forward_with(model, one, {}, qx), qy) for one in task_params]
        looped = [F.cross_entropy(forward_with(model, one, {}, qx), qy) for one in per_task]
        for a, b in zip(torch.autograd.grad(sum(batched), list(params.values())),
                        torch.autograd.grad(sum(looped), list(params.values()))):
            assert_close(a, b)
    same, tasked = inner_loop(forward, params, xs, ys, lr=0.5, steps=0)
    assert tasked == frozenset() and all(same[k] is params[k] for k in params)


def test_adapt_is_pure() -> None:
    model = _model()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    identity = {k: id(v) for k, v in params.items()}
    x, y = _task()
    x_before = x.clone()
    adapted = adapt(model, params, {}, x, y, inner_lr=0.5, steps=2)
    assert adapted is not params
    assert {k: id(v) for k, v in params.items()} == identity
    for k, v in params.items():
        assert_close(v.detach(), before[k])
        assert v.grad is None
        assert not torch.equal(adapted[k], v) or k.endswith(".bias")
    assert_close(x, x_before)
    for k, v in model.named_parameters():
        assert_close(v.detach(), before[k])


def test_adapt_keys_and_zero_steps() -> None:
    model = _model()
    params = dict(model.named_parameters())
    x, y = _task()
    head = ["classifier.weight", "classifier.bias"]
    adapted = adapt(model, params, {}, x, y, inner_lr=0.5, steps=2, keys=head)
    for k, value in params.items():
        assert (adapted[k] is value) == (k not in head)
    same = adapt(model, params, {}, x, y, inner_lr=0.5, steps=0)
    assert same == params and same is not params
    nothing = adapt(model, params, {}, x, y, inner_lr=0.5, steps=2, keys=[])  # no keys: nothing adapts
    assert nothing == params and nothing is not params


def test_adapt_at_test_time_without_grad() -> None:
    model = _model()
    detached = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _task()
    with torch.no_grad():
        adapted = adapt(model, detached, {}, x, y, inner_lr=0.5, steps=2, first_order=True)
    expected = adapt(model, dict(model.named_parameters()), {}, x, y, inner_lr=0.5, steps=2)
    for k in detached:
        assert_close(adapted[k].detach(), expected[k].detach())


def test_inner_step_and_sgd_step() -> None:
    model = _model()
    params = dict(model.named_parameters())
    x, y = _task()
    one = inner_step(model, params, {}, x, y, inner_lr=0.5)
    assert_close(one, adapt(model, params, {}, x, y, inner_lr=0.5, steps=1))
    grads = {"classifier.bias": torch.ones(3, dtype=torch.float64)}
    stepped = sgd_step(params, grads, lr=0.1)
    assert_close(stepped["classifier.bias"], params["classifier.bias"] - 0.1)
    assert stepped["classifier.weight"] is params["classifier.weight"]


def test_sgd_step_with_a_learning_rate_per_name() -> None:
    params = {"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    lrs = {"w": torch.tensor([[0.1], [0.2]], dtype=torch.float64, requires_grad=True),
           "b": torch.full((3,), 0.5, dtype=torch.float64)}
    grads = {"w": torch.full((2, 3), 2.0, dtype=torch.float64)}
    stepped = sgd_step(params, grads, lr=lrs)
    assert_close(stepped["w"], torch.tensor([[0.8] * 3, [0.6] * 3], dtype=torch.float64))
    assert stepped["b"] is params["b"]
    (lr_grad,) = torch.autograd.grad(stepped["w"].sum(), [lrs["w"]])  # the rates stay differentiable
    assert_close(lr_grad, torch.full((2, 1), -6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"no learning rate for \['w'\]"):
        sgd_step(params, grads, lr={"b": lrs["b"]})


def test_errors() -> None:
    model = _model()
    params = dict(model.named_parameters())
    x, y = _task()
    with pytest.raises(ValueError, match="steps"):
        adapt(model, params, {}, x, y, inner_lr=0.5, steps=-1)
    with pytest.raises(ValueError, match="labels"):
        adapt(model, params, {}, x, y[:-1], inner_lr=0.5, steps=1)
    with pytest.raises(ValueError, match="not parameter names"):
        adapt(model, params, {}, x, y, inner_lr=0.5, steps=1, keys=["head.weight"])


def test_task_losses_and_accuracies_ignore_the_ignore_index() -> None:
    # Each task's mean over its labels other than -100, as F.cross_entropy's mean on that task alone.
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 1, 2, 3, 0], [1, IGNORE_INDEX, 1, IGNORE_INDEX, 2], [IGNORE_INDEX] * 4 + [3]])
    assert IGNORE_INDEX == -100
    losses = task_losses(outputs, targets)
    expected = torch.stack([F.cross_entropy(o, t, ignore_index=-100) for o, t in zip(outputs, targets)])
    assert_close(losses, expected, rtol=1e-14, atol=0)
    for a, b in zip(torch.autograd.grad(losses.sum(), outputs), torch.autograd.grad(expected.sum(), outputs)):
        assert_close(a, b, rtol=1e-14, atol=0)
    right = outputs.argmax(dim=-1) == targets
    counted = targets != IGNORE_INDEX
    accs = task_accuracies(outputs, targets)
    # exact: a ratio of small counts, in the outputs' dtype
    assert_close(accs, torch.stack([right[t][counted[t]].double().mean() for t in range(3)]), rtol=0, atol=0)
    assert not accs.requires_grad
    # with a loss_fn: each task's own scalar; anything else is refused
    assert_close(task_losses(outputs, targets, lambda o, t: F.cross_entropy(o, t, reduction="sum")),
                 torch.stack([F.cross_entropy(o, t, reduction="sum") for o, t in zip(outputs, targets)]))
    with pytest.raises(ValueError, match=r"loss_fn must return one scalar per task, got shape \(5,\)"):
        task_losses(outputs, targets, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert task_accuracies(outputs, targets.double()).isnan().all()  # regression targets: no accuracy
