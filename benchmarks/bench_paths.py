"""The three meta-batch strategies against each other: per-task loop, vmap and task-batched.

For each round, config (issue 5's a, a-fo, b, c, d, defined in ``l2l_baseline.CONFIGS``) and strategy,
runs one child process (so peak RSS is per run) that times ``meta_batch_loss`` + backward + Adam step on
one fixed random meta-batch of the config's shapes (as ``l2l_baseline.py`` does; no task sampling) and
prints one JSON line. The order of the strategies rotates between rounds. The parent prints each child's
line as it comes, then one summary JSON line per config (median s/iter over rounds, speed-up vs loop).

Usage::

    python benchmarks/bench_paths.py --threads 1 --rounds 3 --iterations 5
    python benchmarks/bench_paths.py --configs a c --strategies vmap batched
    python benchmarks/bench_paths.py --interleaved --threads 1 --iterations 10   # speed only, same process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from l2l_baseline import CONFIGS, IMAGE_SHAPES, META_LR  # (beside this script; needs no metagrad)

STRATEGIES = ("loop", "vmap", "batched")


def make_step(config: str, strategy: str, *, threads: int, seed: int = 0) -> Any:
    """A function running one meta-training iteration of ``config`` with ``strategy``; returns seconds."""
    import torch

    from metagrad.algorithms.meta_batch import InnerLoop, _task_losses
    from metagrad.bench import IMAGE_SHAPES as DATASET_SHAPES
    from metagrad.training.config import load_preset
    from metagrad.training.setup import make_model
    from metagrad.types import Episode

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    preset = load_preset(cfg["preset"])  # the preset's model (strided Omniglot CNN, 32-filter Mini-ImageNet)
    model = make_model(preset.model, cfg["ways"], DATASET_SHAPES[preset.data.dataset])
    g = torch.Generator().manual_seed(seed)
    t, n, k, q = cfg["meta_batch_size"], cfg["ways"], cfg["shots"], cfg["query_shots"]
    shape = IMAGE_SHAPES[cfg["model"]]
    episode = Episode(torch.rand(t, n * k, *shape, generator=g),
                      torch.arange(n).repeat_interleave(k).repeat(t, 1),
                      torch.rand(t, n * q, *shape, generator=g),
                      torch.arange(n).repeat_interleave(q).repeat(t, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    loop = InnerLoop(cfg["algorithm"], inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"],
                     first_order=cfg["first_order"])

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses, _ = _task_losses(loop, model, dict(model.named_parameters()), {}, episode, strategy=strategy)
        losses.mean().backward()
        optimizer.step()
        return time.perf_counter() - start
    return step


def run_one(config: str, strategy: str, *, iterations: int, warmup: int, threads: int) -> dict[str, Any]:
    """Time one strategy on one config in this process (its peak RSS is this run's)."""
    import torch

    step = make_step(config, strategy, threads=threads)
    times = [step() for _ in range(warmup + iterations)][warmup:]
    return {"config": config, "strategy": strategy, "threads": threads,
            "sec_per_iter": statistics.median(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}


def run_interleaved(config: str, strategies: list[str], *, iterations: int, warmup: int, threads: int
                    ) -> dict[str, Any]:
    """All strategies in one process, alternating every iteration, so that load drift on a shared
    machine hits each alike; the speed-up is the median of same-iteration ratios against the first."""
    steps = {s: make_step(config, s, threads=threads) for s in strategies}
    times: dict[str, list[float]] = {s: [] for s in strategies}
    for i in range(warmup + iterations):
        order = strategies[i % len(strategies):] + strategies[:i % len(strategies)]
        for s in order:
            elapsed = steps[s]()
            if i >= warmup:
                times[s].append(elapsed)
    base = strategies[0]
    out: dict[str, Any] = {"config": config, "threads": threads, "mode": "interleaved",
                           "iterations": iterations}
    for s in strategies:
        out[f"{s}_sec_per_iter"] = statistics.median(times[s])
        out[f"{s}_speedup_vs_{base}"] = statistics.median(b / t for b, t in zip(times[base], times[s]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--interleaved", action="store_true",
                        help="one process per config, strategies alternating every iteration "
                             "(no per-run RSS)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(*args.child, iterations=args.iterations, warmup=args.warmup,
                                 threads=args.threads)), flush=True)
        return 0
    if args.interleaved:
        import torch

        torch.set_num_threads(args.threads)
        for config in args.configs:
            print(json.dumps(run_interleaved(config, args.strategies, iterations=args.iterations,
                                             warmup=args.warmup, threads=args.threads)), flush=True)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for config in args.configs:
            shift = r % len(args.strategies)
            for strategy in args.strategies[shift:] + args.strategies[:shift]:
                cmd = [sys.executable, __file__, "--child", config, strategy, "--threads", str(args.threads),
                       "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                runs.append({**json.loads(out.strip().splitlines()[-1]), "round": r})
                print(json.dumps(runs[-1]), flush=True)
    for config in args.configs:
        summary: dict[str, Any] = {"config": config, "threads": args.threads, "rounds": args.rounds}
        for strategy in args.strategies:
            mine = [x for x in runs if x["config"] == config and x["strategy"] == strategy]
            summary[f"{strategy}_sec_per_iter"] = statistics.median(x["sec_per_iter"] for x in mine)
            summary[f"{strategy}_peak_rss_mb"] = max(x["peak_rss_mb"] for x in mine)
        if "loop" in args.strategies:
            for strategy in args.strategies:
                summary[f"{strategy}_speedup_vs_loop"] = statistics.median(
                    lo["sec_per_iter"] / x["sec_per_iter"]
                    for lo in runs if lo["config"] == config and lo["strategy"] == "loop"
                    for x in runs if x["config"] == config and x["strategy"] == strategy
                    and x["round"] == lo["round"])
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
