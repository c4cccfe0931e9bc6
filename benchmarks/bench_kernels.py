"""Two kernel-level ideas for config a's CPU step, timed in isolation (docs/PERFORMANCE.md, "tried").

1. **BatchNorm at second order.** Config a spends about a quarter of its step in BatchNorm's forward,
   backward and double backward. ``FusedBatchNorm`` here is a BatchNorm (batch statistics, per-channel
   affine) whose backward is itself an ``autograd.Function`` with a hand-derived double backward: each of
   the three passes is a handful of whole-tensor operations instead of ATen's dozen. It is checked
   against ``F.batch_norm`` at second order in float64 before anything is timed. ``--compile`` also times
   the same three kernels compiled by ``torch.compile`` (forward-only graphs, so AOTAutograd's refusal of
   double backward does not apply; needs a C++ compiler; the first call compiles for tens of seconds).
2. **Input gradients of the stride-2 convolutions.** The 64->64, stride-2 convolution on 14x14 maps is
   config a's largest; its input gradient (``convolution_backward``'s data part, computed three or four
   times per chunk of tasks) is timed against ``conv_transpose2d`` on contiguous and on channels-last
   tensors, for the ordinary (shared-weight, 40 images) and the grouped (8 tasks x 5 images) layouts.

Each figure is the median of ``--repeats`` timings of ``--iterations`` calls, 1 thread by default.

Usage::

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 5] [--iterations 20] [--compile] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

DIMS = (0, 2, 3)  # BatchNorm statistics over (N, H, W) of (N, C, H, W)


def _bn_forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    var, mean = torch.var_mean(x, dim=DIMS, keepdim=True, correction=0)
    r = torch.rsqrt(var + eps)  # (1, C, 1, 1)
    xhat = (x - mean) * r
    return xhat * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1), xhat, r


def _bn_backward(g: Tensor, gamma: Tensor, xhat: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # dx = gamma r (g - mean(g) - xhat mean(g xhat)); dgamma = sum(g xhat); dbeta = sum(g)
    m = g.numel() // g.shape[1]
    gb = g.sum(DIMS, keepdim=True)
    gx = (g * xhat).sum(DIMS, keepdim=True)
    dx = (g - gb / m - xhat * (gx / m)) * (gamma.view(1, -1, 1, 1) * r)
    return dx, gx.view(-1), gb.view(-1)


def _bn_double_backward(g: Tensor, gamma: Tensor, xhat: Tensor, r: Tensor, a: Tensor, a_gamma: Tensor,
                        a_beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of <a, dx> + <a_gamma, dgamma> + <a_beta, dbeta> w.r.t. g, x and gamma.

    With per-channel means G1 = <g>, G2 = <g xhat>, A1 = <a>, A2 = <a xhat>, AG = <a g> and
    K = AG - A1 G1 - A2 G2: d/dgamma = r M K; d/dg = gamma r (a - A1 - xhat A2) + a_gamma xhat + a_beta;
    d/dx = r P(h) - gamma K r^2 xhat, where h = (a_gamma - gamma r A2) g - gamma r G2 a is the gradient
    w.r.t. xhat and P(h) = h - <h> - xhat <h xhat> maps it through the normalization (exact with eps).
    """
    m = g.numel() // g.shape[1]
    gam, ag, ab = gamma.view(1, -1, 1, 1), a_gamma.view(1, -1, 1, 1), a_beta.view(1, -1, 1, 1)
    g1 = g.sum(DIMS, keepdim=True) / m
    g2 = (g * xhat).sum(DIMS, keepdim=True) / m
    a1 = a.sum(DIMS, keepdim=True) / m
    a2 = (a * xhat).sum(DIMS, keepdim=True) / m
    k = (a * g).sum(DIMS, keepdim=True) / m - a1 * g1 - a2 * g2
    gr = gam * r
    u = ag - gr * a2  # h = u g - v a
    v = gr * g2
    d_g = gr * a + xhat * u + (ab - gr * a1)
    mean_h = u * g1 - v * a1
    mean_hx = u * g2 - v * a2
    d_x = (r * u) * g - (r * v) * a + (-r * mean_hx - gam * k * r * r) * xhat - r * mean_h
    return d_g, d_x, (r * m * k).view(-1)


KERNELS: dict[str, Callable[..., Any]] = {
    "forward": _bn_forward, "backward": _bn_backward, "double_backward": _bn_double_backward}


class _FusedBatchNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: Tensor, x: Tensor, gamma: Tensor, xhat: Tensor, r: Tensor) -> Any:
        # x only links the graph (its gradient is d_x); xhat and r are x's saved statistics.
        ctx.save_for_backward(g, gamma, xhat, r)
        return KERNELS["backward"](g, gamma, xhat, r)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: Tensor | None, a_gamma: Tensor | None, a_beta: Tensor | None) -> Any:
        g, gamma, xhat, r = ctx.saved_tensors
        zero = torch.zeros_like(gamma)
        d_g, d_x, d_gamma = KERNELS["double_backward"](
            g, gamma, xhat, r, torch.zeros_like(g) if a is None else a,
            zero if a_gamma is None else a_gamma, zero if a_beta is None else a_beta)
        return d_g, d_x, d_gamma, None, None


class FusedBatchNorm(torch.autograd.Function):
    """``F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)`` on (N, C, H, W), to second
    order."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
        y, xhat, r = KERNELS["forward"](x, gamma, beta, eps)
        ctx.save_for_backward(x, gamma, xhat, r)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        x, gamma, xhat, r = ctx.saved_tensors
        dx, dgamma, dbeta = _FusedBatchNormBackward.apply(g, x, gamma, xhat, r)
        return dx, dgamma, dbeta, None


def _native_bn(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)


def _fused_bn(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return FusedBatchNorm.apply(x, gamma, beta, 1e-5)


def _second_order(bn: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, gamma: Tensor, beta: Tensor,
                  w: list[Tensor]) -> tuple[Tensor, ...]:
    """What MAML asks of a layer: gradients with create_graph, then the gradient of a function of them."""
    y = bn(x, gamma, beta)
    inner = (y * w[0]).sum() + 0.1 * (y * y).sum()
    gx, ggamma, gbeta = torch.autograd.grad(inner, (x, gamma, beta), create_graph=True)
    outer = (gx * w[1]).sum() + (ggamma * w[2]).sum() + (gbeta * w[3]).sum()
    return torch.autograd.grad(outer, (x, gamma, beta))


def _bn_inputs(shape: tuple[int, ...], dtype: torch.dtype,
               seed: int = 0) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    gamma = torch.randn(c, generator=g, dtype=dtype).requires_grad_()
    beta = torch.randn(c, generator=g, dtype=dtype).requires_grad_()
    w = [torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype),
         torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)]
    return x, gamma, beta, w


def check_fused_bn() -> float:
    """Largest difference from ATen's BatchNorm at second order, float64; raises if not exact."""
    x, gamma, beta, w = _bn_inputs((5, 6, 4, 3), torch.float64)
    ours = _second_order(_fused_bn, x, gamma, beta, w)
    theirs = _second_order(_native_bn, x, gamma, beta, w)
    err = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    if err > 1e-10:
        raise AssertionError(f"FusedBatchNorm differs from F.batch_norm at second order by {err}")
    return err


def _time(fn: Callable[[], Any], iterations: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call over ``iterations`` calls (after one
    warm-up)."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter() - start) / iterations * 1e3)
    return statistics.median(runs)


def bench_batch_norm(iterations: int, repeats: int, compiled: bool) -> list[dict[str, Any]]:
    eager = dict(KERNELS)
    # Compiled once (dynamic shapes): the first shape's first call pays the compilation, the others reuse it.
    fast = {k: torch.compile(f, dynamic=True, fullgraph=True) for k, f in eager.items()} if compiled else {}
    rows = []
    for shape in [(5, 512, 14, 14), (5, 512, 7, 7), (5, 512, 4, 4), (5, 512, 2, 2)]:
        x, gamma, beta, w = _bn_inputs(shape, torch.float32)
        row: dict[str, Any] = {"shape": list(shape)}
        for name, bn in (("aten_ms", _native_bn), ("fused_eager_ms", _fused_bn)):
            row[name] = round(_time(partial(_second_order, bn, x, gamma, beta, w), iterations, repeats), 3)
        if compiled:
            KERNELS.update(fast)
            try:
                start = time.perf_counter()
                _second_order(_fused_bn, x, gamma, beta, w)
                row["compile_s"] = round(time.perf_counter() - start, 1)
                row["fused_compiled_ms"] = round(
                    _time(partial(_second_order, _fused_bn, x, gamma, beta, w), iterations, repeats), 3)
            finally:
                KERNELS.update(eager)
        rows.append(row)
    return rows


def bench_conv_input_grad(iterations: int, repeats: int) -> list[dict[str, Any]]:
    tasks, batch, channels = 8, 5, 64
    cl = torch.channels_last
    rows = []
    for size in (14, 7, 4):
        for layout, groups in (("ordinary", 1), ("grouped", tasks)):
            g = torch.Generator().manual_seed(0)
            if groups == 1:
                x = torch.randn(tasks * batch, channels, size, size, generator=g)
                w = torch.randn(channels, channels, 3, 3, generator=g)
            else:
                x = torch.randn(batch, tasks * channels, size, size, generator=g)
                w = torch.randn(tasks * channels, channels, 3, 3, generator=g)
            y = F.conv2d(x, w, stride=2, padding=1, groups=groups)
            go = torch.randn(y.shape, generator=g)
            pad = size - ((y.shape[-1] - 1) * 2 - 2 + 3)  # output_padding giving back the input size
            go_cl, w_cl = go.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
            reference = torch.nn.grad.conv2d_input(x.shape, w, go, stride=2, padding=1, groups=groups)
            got = F.conv_transpose2d(go_cl, w_cl, stride=2, padding=1, output_padding=pad, groups=groups)
            if not torch.allclose(got, reference, rtol=1e-4, atol=1e-3):
                raise AssertionError("conv_transpose2d on channels-last is not the convolution's input "
                                     "gradient")
            calls = {
                "forward_ms": partial(F.conv2d, x, w, stride=2, padding=1, groups=groups),
                "backward_data_ms": partial(torch.nn.grad.conv2d_input, x.shape, w, go, stride=2, padding=1,
                                            groups=groups),
                "conv_transpose_ms": partial(F.conv_transpose2d, go, w, stride=2, padding=1,
                                             output_padding=pad, groups=groups),
                "conv_transpose_channels_last_ms": partial(F.conv_transpose2d, go_cl, w_cl, stride=2,
                                                           padding=1, output_padding=pad, groups=groups),
            }
            row: dict[str, Any] = {"map": size, "layout": layout, "images": tasks * batch}
            row.update({name: round(_time(call, iterations, repeats), 3) for name, call in calls.items()})
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--iterations", type=int, default=20, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure; the median is shown")
    parser.add_argument("--compile", action="store_true", help="also time the BatchNorm kernels compiled")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "fused_bn_max_error_float64": check_fused_bn(),
        "batch_norm_second_order": bench_batch_norm(args.iterations, args.repeats, args.compile),
        "conv_input_gradient": bench_conv_input_grad(args.iterations, args.repeats),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"torch {result['torch']}, {result['threads']} thread(s); FusedBatchNorm equals F.batch_norm at "
          f"second order to {result['fused_bn_max_error_float64']:.1e} (float64)")
    print("\nBatchNorm forward + backward (create_graph) + double backward, ms:")
    for row in result["batch_norm_second_order"]:
        extra = f"  compiled {row['fused_compiled_ms']:7.2f}" if "fused_compiled_ms" in row else ""
        if row.get("compile_s", 0) >= 0.1:
            extra += f" (first call compiles: {row['compile_s']} s)"
        print(f"  {tuple(row['shape'])!s:18} ATen {row['aten_ms']:7.2f}  "
              f"fused eager {row['fused_eager_ms']:7.2f}{extra}")
    print("\nStride-2 3x3 convolution, 64 -> 64 channels, input gradient, ms:")
    for row in result["conv_input_gradient"]:
        print(f"  {row['map']:2d}x{row['map']:<2d} {row['layout']:8}  forward {row['forward_ms']:6.2f}  "
              f"backward-data {row['backward_data_ms']:6.2f}  "
              f"conv_transpose2d {row['conv_transpose_ms']:6.2f}  "
              f"channels-last {row['conv_transpose_channels_last_ms']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
