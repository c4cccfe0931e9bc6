"""Where the time of one metagrad meta-training step goes: torch.profiler over ``metagrad bench``'s step.

Builds the same step as ``metagrad.bench.run_bench`` (random uint8 dataset of the preset's shapes,
``EpisodeSampler``, ``meta_train_step`` with Adam), warms up, then profiles a few iterations and prints
the operators by self time, and the time split between sampling, forward and backward.

Usage::

    python benchmarks/profile_step.py --preset omniglot-maml-5w1s [--iterations 2] [--threads 1]
        [--vectorize/--no-vectorize] [--trace trace.json] [--rows 25]
    python benchmarks/profile_step.py --preset mini-imagenet-maml-5w1s --heap   # where the C heap grows

``--heap`` (glibc only) runs the steps without the profiler, reading ``mallinfo2()`` after every operator:
each step's live bytes at their peak and the heap's size, and every operator after which the heap grew by
1 MB or more. Freed memory is kept as ``metagrad bench`` keeps it, so a heap much larger than the live peak
is free space in holes that later, larger blocks did not fit.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from metagrad import _malloc
from metagrad.algorithms import make, meta_train_step
from metagrad.bench import _random_dataset
from metagrad.data.episodes import EpisodeSampler
from metagrad.training.config import algorithm_settings, load_preset
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
    parser.add_argument("--heap", action="store_true",
                        help="instead of profiling, log where glibc's heap grows (see the module doc)")
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

    algorithm = make(meta.algorithm, inner_lr=meta.inner_lr, inner_steps=meta.inner_steps,
                     first_order=meta.first_order, **algorithm_settings(meta))

    def step() -> None:
        with record_function("## sample"):
            episode = sampler.sample(meta.meta_batch_size, generator)
        with record_function("## meta_train_step"):
            meta_train_step(algorithm, model, optimizer, episode, vectorize=meta.vectorize)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    step()
    print(f"{args.preset}: vectorize={meta.vectorize}, {torch.get_num_threads()} threads, "
          f"unprofiled step {time.perf_counter() - start:.3f} s", file=sys.stderr)

    if args.heap:
        return _trace_heap(step, args.iterations)
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


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+)
    _fields_ = [(name, ctypes.c_size_t)
                for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                             "fsmblks", "uordblks", "fordblks", "keepcost")]


class _HeapLog(TorchDispatchMode):
    """After each operator: the main heap's size and live bytes; the operators after which it grew."""

    def __init__(self, mallinfo2: ctypes._CFuncPtr) -> None:
        super().__init__()
        self.mallinfo2 = mallinfo2
        self.heap = mallinfo2().arena / 2**20  # the heap before the step
        self.peak_live = 0.0
        self.ops = 0
        self.peak_at = ""
        self.growth: list[tuple[int, str, float, float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        info = self.mallinfo2()
        heap, live = info.arena / 2**20, info.uordblks / 2**20
        self.ops += 1
        if live > self.peak_live:
            self.peak_live, self.peak_at = live, f"operator {self.ops} ({func})"
        outputs = out if isinstance(out, (tuple, list)) else [out]
        size = sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor)) / 2**20
        if heap >= self.heap + 1:
            self.growth.append((self.ops, str(func), size, heap - self.heap, live))
        self.heap = heap
        return out


def _trace_heap(step: object, iterations: int) -> int:
    libc = _malloc.glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        print("--heap needs glibc 2.33 or later (mallinfo2)", file=sys.stderr)
        return 2
    libc.mallinfo2.restype = _MallInfo2
    for i in range(iterations):
        log = _HeapLog(libc.mallinfo2)
        with log:
            step()  # type: ignore[operator]
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"step {i}: {log.ops} operators, live peak {log.peak_live:.0f} MB after {log.peak_at}, "
              f"heap {log.heap:.0f} MB, "
              f"process peak RSS {maxrss:.0f} MB; the heap grew after:")
        for op, name, size, grew, live in log.growth:
            print(f"  operator {op:6d} {name:45s} output {size:6.1f} MB  heap +{grew:5.1f} MB  "
                  f"live {live:6.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
