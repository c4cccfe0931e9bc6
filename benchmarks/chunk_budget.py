"""The CPU chunk budget (``strategies.CPU_CHUNK_ELEMENTS``) against itself and torch.func, in one process.

``--tasks-per-chunk`` can only lower the automatic chunk, so a larger budget cannot be timed through the
command: this script patches the budget per variant and times ``metagrad.meta_train_step`` on one fixed
random meta-batch of a config of ``l2l_baseline.CONFIGS``, beside PyTorch's torch.func recipe
(``peer_recipes``) on the same tensors. Freed memory is kept in the heap, as the ``metagrad`` command
does; run it with ``GOMP_SPINCOUNT=300000`` in the environment to match the command's OpenMP setting.
Variants alternate order every round; prints median s/iter per variant.

Usage::

    GOMP_SPINCOUNT=300000 python benchmarks/chunk_budget.py --config c --threads 2 --budgets 19 21 whole
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2l_baseline import CONFIGS, _random_tasks
from peer_recipes import make_recipe

import metagrad as mg
from metagrad import _malloc
from metagrad.algorithms import strategies


def _time(variants: dict[str, Callable[[], None]], rounds: int, iterations: int) -> dict[str, list[float]]:
    """s/iter of each variant in each round, after two untimed steps each; order reversed every round."""
    for step in variants.values():  # warm-up: allocator, lazy initialisation
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(iterations):
                variants[name]()
            times[name].append((time.perf_counter() - start) / iterations)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="c", choices=list(CONFIGS),
                        help="l2l_baseline's config (default: c)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (default: torch's)")
    parser.add_argument("--budgets", nargs="+", default=["19", "21", "whole"],
                        help="budgets as powers of two of elements (19 = 512K) or 'whole' "
                             "(default: 19 21 whole)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default: 4)")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--no-torch-func", action="store_true", help="leave out torch.func's recipe")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if cfg["first_order"]:
        parser.error("the torch.func recipe is second order: pick a second-order config")
    torch.manual_seed(0)
    extra = {"strided": True} if cfg["model"] == "omniglot-cnn" else {}
    model = mg.build_model(cfg["model"], ways=cfg["ways"], **extra)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    episode = mg.Episode(*_random_tasks(cfg, torch.device("cpu"), torch.Generator().manual_seed(0)))

    def metagrad_step(budget: int) -> Callable[[], None]:
        def step() -> None:
            strategies.CPU_CHUNK_ELEMENTS = budget
            algorithm = mg.make(cfg["algorithm"], inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"])
            mg.meta_train_step(algorithm, model, optimizer, episode)
        return step

    variants = {f"budget {b}": metagrad_step(1 << 62 if b == "whole" else 1 << int(b)) for b in args.budgets}
    if not args.no_torch_func:
        _, meta_backward, parameters, _ = make_recipe("torch.func", cfg)
        tf_optimizer = torch.optim.Adam(parameters, lr=1e-3)

        def torch_func_step() -> None:
            meta_backward(episode.support_x, episode.support_y, episode.query_x, episode.query_y)
            tf_optimizer.step()
        variants["torch.func"] = torch_func_step
    default_budget = strategies.CPU_CHUNK_ELEMENTS
    try:
        times = _time(variants, args.rounds, args.iterations)
    finally:
        strategies.CPU_CHUNK_ELEMENTS = default_budget
    print(f"config {args.config}, {args.threads} threads, {args.rounds} rounds of {args.iterations} steps")
    for name, values in times.items():
        print(f"  {name:12s} median {statistics.median(values):.4f} s/iter  "
              + " ".join(f"{v:.4f}" for v in values))
    return 0


if __name__ == "__main__":
    _malloc.tune()  # as the metagrad command does (the process's setting, so not in main)
    raise SystemExit(main())
