"""Where the time of one metagrad meta-training step goes: torch.profiler over ``metagrad bench``'s step.

Builds the same step as ``metagrad.bench.run_bench`` (random uint8 dataset of the preset's shapes,
``EpisodeSampler``, ``meta_train_step`` with Adam), warms up, then profiles a few iterations and prints
the operators by self time, and the time split between sampling, forward and backward.

Usage::

    python benchmarks/profile_step.py --preset omniglot-maml-5w1s [--iterations 2] [--threads 1]
        [--vectorize/--no-vectorize] [--trace trace.json] [--rows 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from metagrad import _malloc
from metagrad.algorithms import meta_train_step
from metagrad.bench import _random_dataset
from metagrad.data.episodes import EpisodeSampler
from metagrad.training.config import load_preset
from metagrad.training.setup import make_model, resolve_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--iterations", type=int, default=2, help="profiled iterations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vectorize", action=argparse.BooleanOptionalAction, default=None,
                        help="override the preset's meta.vectorize")
    parser.add_argument("--sort", default=None, help="profiler sort key (default: self_cpu/cuda_time_total)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--memory", action="store_true", help="also profile memory (slower)")
    parser.add_argument("--trace", help="write a Chrome trace here")
    args = parser.parse_args(argv)
    _malloc.tune()  # as `metagrad bench` does (METAGRAD_MALLOC=huge needs THP_MEM_ALLOC_ENABLE=1 at start)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_preset(args.preset)
    meta = config.meta if args.vectorize is None else replace(config.meta, vectorize=args.vectorize)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    dataset = _random_dataset(config, generator)
    data = config.data
    sampler = EpisodeSampler(dataset, data.ways, data.shots, data.query_shots, device=device)
    model = make_model(config.model, data.ways, dataset.image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=meta.meta_lr)

    def step() -> None:
        with record_function("## sample"):
            episode = sampler.sample(meta.meta_batch_size, generator)
        with record_function("## meta_train_step"):
            meta_train_step(meta.algorithm, model, optimizer, episode, inner_lr=meta.inner_lr,
                            inner_steps=meta.inner_steps, first_order=meta.first_order,
                            vectorize=meta.vectorize)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    step()
    print(f"{args.preset}: vectorize={meta.vectorize}, {torch.get_num_threads()} threads, "
          f"unprofiled step {time.perf_counter() - start:.3f} s", file=sys.stderr)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, profile_memory=args.memory) as prof:
        for _ in range(args.iterations):
            step()
    sort = args.sort or ("self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.rows,
                                                             max_name_column_width=40,
                                                             max_shapes_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
