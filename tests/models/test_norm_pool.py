"""ConvBlock's BatchNorm and max-pool inside ``task_batch`` (``_NormMaxPool``: no full-size BatchNorm
output) against the single-task block (BatchNorm, then the pool), task by task: values, first- and
second-order gradients, what the forward saves."""

from __future__ import annotations

import pytest
import torch
from pools import POOLS
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from metagrad.models.layers import ConvBlock, MaxPool2d, _NormMaxPool, task_batch

SIGNS = {  # BatchNorm weights per task and channel; a negative one pools each window's minimum of x
    "positive": [[0.5, 1.2, 0.8], [2.0, 0.3, 1.0], [0.7, 0.9, 1.1]],
    "mixed": [[0.5, -1.2, 0.8], [-2.0, 0.3, -1.0], [0.7, 0.9, -1.1]],
}
TASKS = 3


def _block_and_params(pool: dict, signs: str, seed: int = 0) -> tuple[ConvBlock, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    block = ConvBlock(2, 3).double()
    block.pool = MaxPool2d(**pool)
    params = {name: (p.detach().expand(TASKS, *p.shape) + 0.2 * torch.randn(TASKS, *p.shape,
                                                                              dtype=torch.float64))
              for name, p in block.named_parameters()}
    params["norm.weight"] = torch.tensor(SIGNS[signs], dtype=torch.float64)
    return block, {k: v.requires_grad_() for k, v in params.items()}


def _batched(block: ConvBlock, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with task_batch(x.shape[0]):
        return torch.func.functional_call(block, params, (x,))


def _per_task(block: ConvBlock, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.func.functional_call(block, {k: v[t] for k, v in params.items()}, (x[t],))
                        for t in range(x.shape[0])])


@pytest.mark.parametrize("signs", SIGNS)
@pytest.mark.parametrize("pool", POOLS)
def test_values_and_gradients_match_batchnorm_then_pool(pool: str, signs: str) -> None:
    block, params = _block_and_params(POOLS[pool], signs)
    x = torch.randn(TASKS, 5, 2, 9, 8, dtype=torch.float64)
    out, expected = _batched(block, params, x), _per_task(block, params, x)
    assert (expected == 0).any() and (expected > 0).any()  # ReLU cuts some windows
    assert_close(out, expected)
    target = torch.randn_like(expected)
    names = list(params)

    def first(f: object, create_graph: bool) -> tuple[torch.Tensor, ...]:
        loss = (f(block, params, x) * target).sin().sum()  # type: ignore[operator]
        return torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)

    for a, b, name in zip(first(_batched, False), first(_per_task, False), names):  # the in-place backward
        assert_close(a, b, msg=name)

    def second(f: object) -> tuple[torch.Tensor, ...]:  # MAML's: the gradient of a function of the gradient
        g = first(f, True)
        return torch.autograd.grad(sum(gi.square().sum() for gi in g), [params[k] for k in names])

    for a, b, name in zip(second(_batched), second(_per_task), names):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("pool", ["2x2", "3x3-stride-2-pad-1"])
def test_gradcheck_and_gradgradcheck(pool: str) -> None:
    torch.manual_seed(1)
    kw = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, **POOLS[pool]}
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.5, -1.2, 0.8, 2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _NormMaxPool.apply(x, weight, bias, 1e-3, kw["kernel_size"], kw["stride"] or kw["kernel_size"],
                                  kw["padding"], kw["dilation"], kw["ceil_mode"])[0]

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_zero_weight_takes_the_gradient_from_above() -> None:
    """A weight of exactly 0 ties every window at the bias: the values are BatchNorm-then-pool's, and the
    weight's gradient is its limit from above (each window's largest normalized value)."""
    block, params = _block_and_params(POOLS["2x2"], "positive", seed=2)
    with torch.no_grad():
        params["norm.weight"][1, 2] = 0.0
        params["norm.bias"].fill_(1.0)  # ReLU passes every window
    x = torch.randn(TASKS, 5, 2, 8, 8, dtype=torch.float64)
    out = _batched(block, params, x)
    assert_close(out, _per_task(block, params, x))
    grad = torch.autograd.grad(out[1, :, 2].sum(), params["norm.weight"])[0][1, 2]
    conv = {"weight": params["conv.weight"][1], "bias": params["conv.bias"][1]}
    h = torch.func.functional_call(block.conv, conv, (x[1],))[:, 2]
    normalized = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + block.norm.eps)
    assert_close(grad, torch.nn.functional.max_pool2d(normalized.unsqueeze(1), 2).sum())


def test_forward_saves_the_convolution_output_once() -> None:
    """Of full-size tensors the block keeps only the convolution's output (BatchNorm's backward needs it);
    neither BatchNorm's output nor its normalized input is kept or passed to the pool."""
    block, params = _block_and_params(POOLS["2x2"], "mixed")
    x = torch.randn(TASKS, 5, 2, 8, 8, dtype=torch.float64)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _batched(block, params, x)
    full = [t for t in saved if t.numel() == TASKS * 5 * 3 * 8 * 8]
    assert len(full) == 1 and full[0].dtype == torch.float64
    indices = [t for t in saved if t.dtype == torch.int64]
    assert [tuple(t.shape) for t in indices] == [(5, TASKS * 3, 4, 4)]
    out.sum().backward()


def test_cpu_pools_the_convolution_output_itself_unless_a_weight_is_negative() -> None:
    """With no negative weight the pool reads x itself; with one, a sign-flipped copy."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pooled: list[torch.Tensor] = []

    class Pools(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.max_pool2d_with_indices.default:
                pooled.append(args[0])
            return func(*args, **(kwargs or {}))

    for weight, copies in (([0.5, 0.0, 2.0], False), ([0.5, -1.0, 2.0], True)):
        pooled.clear()
        with Pools():
            w = torch.tensor(weight, dtype=torch.float64)
            _NormMaxPool.apply(x, w, torch.zeros_like(w), 1e-3, 2, 2, 0, 1, False)
        assert len(pooled) == 1 and (pooled[0].data_ptr() != x.data_ptr()) == copies
