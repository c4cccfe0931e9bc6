"""BatchNorm written from mean and variance: same values and (second-order) gradients as torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from metagrad.models.layers import BN_EPS, BatchNorm, ConvBlock


def _bn(shape: tuple[int, ...]) -> BatchNorm:
    bn = BatchNorm(shape[1]).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4, 4)])
def test_forward_matches_torch_batch_norm(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    bn = _bn(shape)
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=BN_EPS)
    assert_close(bn(x), expected)


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4, 4)])
def test_double_backward_matches_torch_batch_norm(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bn = _bn(shape)
    target = torch.randn(shape, dtype=torch.float64)

    def grad_norm(y_of: object) -> tuple[torch.Tensor, ...]:
        # A MAML-like second-order quantity: gradient of a function of the first gradient.
        loss = (y_of(x) * target).sin().sum()  # type: ignore[operator]
        g = torch.autograd.grad(loss, [x, bn.weight], create_graph=True)
        return torch.autograd.grad(sum(gi.square().sum() for gi in g), [x, bn.weight, bn.bias])

    ours = grad_norm(bn)
    theirs = grad_norm(lambda z: F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=BN_EPS))
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_second_order_under_vmap_matches_loop() -> None:
    """The trap of torch 2.13's F.batch_norm: vmap + second-order torch.func.grad. Ours must be exact."""
    torch.manual_seed(0)
    block = ConvBlock(2, 3).double()
    params = dict(block.named_parameters())
    xs = torch.randn(4, 5, 2, 8, 8, dtype=torch.float64)  # (T, B, C, H, W)
    ys = torch.randn(4, 5, 3, 4, 4, dtype=torch.float64)

    def task_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def inner(q: dict[str, torch.Tensor]) -> torch.Tensor:
            return (torch.func.functional_call(block, q, (x,)) * y).sum()

        g = torch.func.grad(inner)(p)
        fast = {k: p[k] - 0.1 * g[k] for k in p}
        return torch.func.functional_call(block, fast, (x,)).square().mean()

    vmapped = torch.func.vmap(task_loss, in_dims=(None, 0, 0))(params, xs, ys).sum()
    looped = sum(task_loss(params, x, y) for x, y in zip(xs, ys))
    assert_close(vmapped, looped)
    for a, b in zip(torch.autograd.grad(vmapped, list(params.values())),
                    torch.autograd.grad(looped, list(params.values()))):
        assert_close(a, b)


def test_uses_batch_statistics_in_eval_mode() -> None:
    bn = _bn((4, 3))
    x = torch.randn(4, 3, dtype=torch.float64) + 5
    train_out = bn(x)
    bn.eval()
    assert_close(bn(x), train_out)
    assert list(bn.buffers()) == []
