"""metagrad's MaxPool2d (backward from the indices alone) against torch's: values, gradients, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pools import POOLS
from torch import nn
from torch.testing import assert_close

from metagrad.models.layers import ConvBlock, MaxPool2d, task_batch


def _second_order(pool: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A MAML-like quantity: the gradient of a function of the first gradient, through the pool."""
    w = torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype).view(1, -1, 1, 1).requires_grad_()
    loss = (pool(x * w) * target).sin().sum()
    g = torch.autograd.grad(loss, [x, w], create_graph=True)
    return torch.autograd.grad(sum(gi.square().sum() for gi in g), [x, w])


@pytest.mark.parametrize("name", POOLS)
def test_values_indices_and_gradients_match_torch(name: str) -> None:
    torch.manual_seed(0)
    kwargs = POOLS[name]
    ours, theirs = MaxPool2d(**kwargs, return_indices=True), nn.MaxPool2d(**kwargs, return_indices=True)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    (out, idx), (expected, expected_idx) = ours(x), theirs(x)
    assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
    target = torch.randn_like(expected)
    first = torch.autograd.grad((out * target).sum(), x)[0]
    assert_close(first, torch.autograd.grad((expected * target).sum(), x)[0], rtol=0, atol=0)
    plain = [MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)]
    for a, b in zip(*(_second_order(p, x, target) for p in plain)):
        assert_close(a, b)


def test_gradcheck_and_unbatched_input() -> None:
    torch.manual_seed(1)
    pool = MaxPool2d(3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))
    chw = torch.randn(3, 6, 6, dtype=torch.float64)
    assert torch.equal(pool(chw), nn.MaxPool2d(3, stride=2, padding=1)(chw))


def test_backward_keeps_the_indices_not_the_input() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = MaxPool2d(2)(x * 2)
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((2, 3, 4, 4), torch.int64)]
    out.sum().backward()
    assert_close(x.grad.sum(), torch.tensor(2.0 * out.numel()))


def test_second_order_under_vmap_matches_loop() -> None:
    torch.manual_seed(2)
    pool = MaxPool2d(3, stride=2, padding=1)
    xs = torch.randn(4, 5, 2, 7, 7, dtype=torch.float64)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def task_loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        def inner(v: torch.Tensor) -> torch.Tensor:
            return pool(x * v.view(-1, 1, 1)).sin().sum()

        fast = w - 0.1 * torch.func.grad(inner)(w)
        return pool(x * fast.view(-1, 1, 1)).square().mean()

    vmapped = torch.func.vmap(task_loss, in_dims=(None, 0))(w, xs).sum()
    looped = sum(task_loss(w, x) for x in xs)
    assert_close(vmapped, looped)
    assert_close(torch.autograd.grad(vmapped, w)[0], torch.autograd.grad(looped, w)[0])


def test_task_batch_matches_each_task() -> None:
    torch.manual_seed(3)
    pool = MaxPool2d(2, return_indices=True)
    x = torch.randn(3, 4, 2, 6, 6)  # (T, B, C, H, W)
    with task_batch(3):
        out, idx = pool(x)
    for t in range(3):
        expected, expected_idx = F.max_pool2d_with_indices(x[t], 2)
        assert torch.equal(out[t], expected) and torch.equal(idx[t], expected_idx)


def test_conv_block_relu_after_pool_is_relu_before_pool() -> None:
    """ConvBlock pools before its ReLU: the same values and second-order gradients as conv-BN-ReLU-pool,
    including windows whose maximum is negative (where ReLU first would tie them at zero)."""
    torch.manual_seed(4)
    block = ConvBlock(2, 3).double()
    params = dict(block.named_parameters())
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    target = torch.randn(6, 3, 4, 4, dtype=torch.float64)

    def paper_order(p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1)
        h = torch.func.functional_call(block.norm, {"weight": p["norm.weight"], "bias": p["norm.bias"]}, (h,))
        return F.max_pool2d(F.relu(h), 2)

    def ours(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(block, p, (x,))

    assert (ours(params) == 0).any()  # some windows are all negative
    assert torch.equal(ours(params), paper_order(params))

    def meta_grad(f: object) -> tuple[torch.Tensor, ...]:
        g = torch.autograd.grad((f(params) * target).sum(), list(params.values()), create_graph=True)  # type: ignore[operator]
        return torch.autograd.grad(sum(gi.square().sum() for gi in g), list(params.values()))

    for a, b in zip(meta_grad(ours), meta_grad(paper_order)):
        assert_close(a, b)
