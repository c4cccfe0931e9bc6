"""MAML on sinusoid regression, the MAML paper's first experiment (Finn et al. 2017, section 5.1).

Each task is a sine wave ``y = A sin(x - phase)`` with amplitude A ~ U[0.1, 5] and phase ~ U[0, pi];
inputs x ~ U[-5, 5]. The model (1 -> 40 -> 40 -> 1, ReLU) adapts with one gradient step of size 0.01 on
K = 10 points, scored by mean squared error on 10 others; meta-batch 25 tasks, Adam at 1e-3 (the paper's
settings). The whole meta-batch is one vectorized computation: ``meta_train_step`` with
``loss_fn=F.mse_loss``.

    python examples/sinusoid.py --iterations 70000   # the paper's length; --help lists the options
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg


def sample_tasks(tasks: int, shots: int, generator: torch.Generator) -> mg.Episode:
    """``tasks`` sine waves, each with ``shots`` support and ``shots`` query points: x, y (T, K, 1)."""
    amplitude = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(tasks, 2 * shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return mg.Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10000, help="outer steps (paper: 70000)")
    parser.add_argument("--shots", type=int, default=10, help="K: points per support and query set")
    parser.add_argument("--meta-batch-size", type=int, default=25, help="tasks per outer step")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="inner step size")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate of the outer loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the task streams")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    train_tasks = torch.Generator().manual_seed(args.seed)
    test = sample_tasks(600, args.shots, torch.Generator().manual_seed(args.seed + 1))

    def test_mse(steps: int) -> float:
        losses, _ = mg.evaluate_with_losses(
            mg.MAML(inner_lr=args.inner_lr, inner_steps=steps, loss_fn=F.mse_loss), model,
            dict(model.named_parameters()), {}, test)
        return losses.mean().item()

    for i in range(1, args.iterations + 1):
        out = mg.meta_train_step(mg.MAML(inner_lr=args.inner_lr, inner_steps=1, loss_fn=F.mse_loss), model,
                                 optimizer, sample_tasks(args.meta_batch_size, args.shots, train_tasks))
        if i % max(1, args.iterations // 10) == 0 or i == args.iterations:
            print(f"iteration {i}: meta-training MSE {out.loss.item():.3f}", flush=True)
    result = {"test_mse_before_adaptation": test_mse(0), "test_mse_after_1_step": test_mse(1),
              "test_mse_after_10_steps": test_mse(10)}
    print(", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
