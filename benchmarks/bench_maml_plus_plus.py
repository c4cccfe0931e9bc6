"""The cost of a MAML++ step against a plain MAML step of the same shapes, measured in the same run.

Both arms time ``metagrad.bench.run_bench`` (sampling, meta-batch loss, backward, Adam) on random data of
the shapes MAML++'s Omniglot 5-way 1-shot configuration uses (the reference code's
``experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json``: 8 tasks per meta-batch, 5 inner steps,
64 filters, second order):

- ``maml``: plain second-order MAML;
- ``maml++``: the MAML++ options metagrad implements, as in the first epoch of training: the multi-step
  loss (query loss after every inner step) and learned per-layer per-step rates (LSLR). BNWB is not
  implemented, so it is not timed; CA and DA change no step's cost (DA makes early steps first order).

The arms alternate within each round, at each thread count. One JSON line per thread count: each arm's
median seconds per iteration and the MAML++/MAML ratio (above 1: MAML++ slower).

Usage::

    python benchmarks/bench_maml_plus_plus.py --threads 1 2 --rounds 3 --iterations 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import metagrad  # noqa: F401  (before torch: metagrad/_openmp.py)

# isort: split
import torch

from metagrad.bench import run_bench
from metagrad.training.config import load_preset


def arms(preset: str) -> dict[str, object]:
    base = load_preset(preset)
    maml = dataclasses.replace(base, meta=dataclasses.replace(base.meta, inner_steps=5, meta_batch_size=8),
                               run=dataclasses.replace(base.run, device="cpu"))
    plus = dataclasses.replace(maml, meta=dataclasses.replace(
        maml.meta, learned_inner_lr="per-layer-per-step", iterations_per_epoch=500, msl_epochs=10))
    return {"maml": maml, "maml++": plus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="omniglot-maml-5w1s")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args(argv)
    configs = arms(args.preset)
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, config in configs.items():
                result = run_bench(config, iterations=args.iterations, warmup=1, report=False,
                                   count_flops=False)
                times[name].append(result["sec_per_iter"])
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(json.dumps({"threads": threads, "sec_per_iter": medians, "rounds": times,
                          "ratio_maml++_to_maml": medians["maml++"] / medians["maml"],
                          "load_avg": os.getloadavg()[0], "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
