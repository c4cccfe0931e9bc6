"""The cost of a MAML++ step against a plain MAML step of the same shapes, measured in the same run.

Every arm times ``metagrad.bench.run_bench`` (sampling, meta-batch loss, backward, Adam) on random data of
the ``omniglot-mamlpp-5w1s`` preset's shapes (the reference code's
``experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json``: 8 tasks per meta-batch, 5 inner steps,
one query per class, 64 filters with max-pooling, second order):

- ``maml``: plain second-order MAML (the preset with LSLR, BNWB and MSL off);
- ``maml++ (MSL + LSLR)``: the multi-step loss (a query forward after every inner step) and learned
  per-layer per-step rates, as in the first epoch of training;
- ``maml++ (all)``: the preset as it is, also with BNWB (per-step BatchNorm weights and biases). CA and DA
  change no step's cost (DA makes early steps first order; the preset trains second order throughout).

The arms alternate within each round, at each thread count. One JSON line per thread count: each arm's
median seconds per iteration and its ratio to MAML's (above 1: slower than MAML).

Usage::

    python benchmarks/bench_maml_plus_plus.py --threads 1 2 --rounds 3 --iterations 4
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
    plus = load_preset(preset)
    plus = dataclasses.replace(plus, run=dataclasses.replace(plus.run, device="cpu"))
    meta = plus.meta
    msl_lslr = dataclasses.replace(plus, meta=dataclasses.replace(meta, per_step_bn=False))
    maml = dataclasses.replace(plus, meta=dataclasses.replace(
        meta, learned_inner_lr="none", per_step_bn=False, msl_epochs=0, lr_schedule="constant",
        min_meta_lr=0.0))
    return {"maml": maml, "maml++ (MSL + LSLR)": msl_lslr, "maml++ (all)": plus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="omniglot-mamlpp-5w1s")
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
                          "ratio_to_maml": {name: t / medians["maml"] for name, t in medians.items()},
                          "load_avg": os.getloadavg()[0], "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
