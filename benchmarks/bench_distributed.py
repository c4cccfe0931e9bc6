"""Data-parallel scaling: meta-training tasks per second with 1 process against N under torchrun.

Each configuration runs this script's worker, as one process or as ``torchrun --standalone
--nproc-per-node N``. The worker times the data-parallel step that ``metagrad train`` takes, with the
same functions: every process samples the whole meta-batch, computes the meta-gradient of its slice
(``compute_meta_gradients``), all-reduces the gradients, gathers the tasks' losses and accuracies,
agrees on stopping, and takes the Adam step. Data: the real Omniglot train split when it is found
(--data-dir, else $METAGRAD_DATA, else ../shared/data), otherwise random uint8 images of its shape,
which cost the same.

Reported per process count, as the median over ``--rounds`` interleaved rounds (a shared machine's
load drifts): tasks per second (wall clock), and CPU seconds per task summed over the processes.
``cpu_efficiency`` = CPU per task of the baseline / CPU per task with N processes: the share of the
work that is not duplicated or spent on the exchange, so ``N * cpu_efficiency`` is the speedup to
expect when N cores are free, whatever the load was during the measurement (the load average is
recorded beside the numbers). On a CPU every process gets ``--threads`` threads; on GPUs
(``--device cuda --processes 1,2,4,8``) each process takes one GPU. Prints one JSON line.

``--ceiling`` also runs, for each N > 1, N *independent* processes at once (no process group, no
exchange), each computing the meta-gradient of its 1/N of the meta-batch: what the machine gives N
processes that never talk. ``ceiling`` is their summed tasks per second over the baseline's, the most
any data-parallel implementation can reach here; ``speedup / ceiling`` is the share of it metagrad's
torchrun path keeps. On a virtual machine whose cores share caches, memory bandwidth or a physical
core, the ceiling itself is below N.

    python benchmarks/bench_distributed.py [--processes 1,2] [--threads 1] [--iterations 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metagrad import _malloc
from metagrad.data.datasets import FewShotDataset, load_dataset
from metagrad.data.episodes import EpisodeSampler, task_generator
from metagrad.errors import DataError
from metagrad.training import distributed, loop, setup
from metagrad.training.config import load_preset

TARGET_2_PROCESSES = 1.8
"""The issue's target on a 2-core CPU: 2 processes of 1 thread against 1 process of 1 thread."""

OMNIGLOT_TRAIN_SHAPE = (4400, 20, 1, 28, 28)  # 1100 characters x 4 rotations
RESULT_PREFIX = "bench_distributed rank result: "


def omniglot_train(data_dir: str | None) -> tuple[FewShotDataset, str]:
    candidates = [data_dir, os.environ.get("METAGRAD_DATA"),
                  str(Path(__file__).resolve().parents[2] / "shared" / "data")]
    for candidate in filter(None, candidates):
        try:
            return load_dataset("omniglot", "train", data_dir=candidate, download=False), candidate
        except DataError:
            continue
    images = torch.randint(0, 256, OMNIGLOT_TRAIN_SHAPE, dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return FewShotDataset("omniglot-random", "train", images), "random uint8 of the real shape"


def worker(args: argparse.Namespace) -> None:
    """Time the data-parallel step in this process; print one result line (every rank)."""
    _malloc.tune()  # as `metagrad train` does (METAGRAD_MALLOC=huge needs THP_MEM_ALLOC_ENABLE=1 at start)
    torch.set_num_threads(args.threads)
    config = load_preset(args.preset)
    data, meta = config.data, config.meta
    world = distributed.world_from_environment()
    distributed.check_meta_batch_size(meta.meta_batch_size, world)
    share = args.share or 1  # --ceiling's independent processes: world of 1, a 1/share slice, no exchange
    device = distributed.process_device(world, setup.resolve_device(args.device))
    with distributed.process_group(world, device, timeout_s=600):
        dataset, source = omniglot_train(args.data_dir)
        sampler = EpisodeSampler(dataset, data.ways, data.shots, data.query_shots, device=device)
        torch.manual_seed(0)
        model = setup.make_model(config.model, data.ways, dataset.image_shape).to(device)
        params = dict(model.named_parameters())
        learner = setup.Learner(model, params, {}, {})
        optimizer = torch.optim.Adam(params.values(), lr=meta.meta_lr)
        generator = task_generator(0, "train")
        first, last = distributed.task_range(meta.meta_batch_size, world)
        last = first + (last - first) // share
        mine = torch.arange(first, last)

        def step() -> None:  # as loop._train's iteration, without the metric rows
            episode = sampler.sample(meta.meta_batch_size, generator)
            out, grad_sum = loop.compute_meta_gradients(learner, episode.slice(first, last), meta)
            scores = distributed.exchange_meta_gradient(world, params, grad_sum, meta.meta_batch_size,
                                                        torch.stack([out.task_losses, out.task_accs], 1),
                                                        mine)
            scores.mean(dim=0).tolist()
            loop.apply_meta_update(optimizer, meta.meta_lr)
            distributed.any_rank(world, False)

        for _ in range(args.warmup):
            step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.iterations):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(RESULT_PREFIX + json.dumps({"rank": world.rank, "wall_s_per_iter": wall / args.iterations,
                                      "cpu_s_per_iter": cpu / args.iterations, "data": source,
                                      "meta_batch_size": meta.meta_batch_size, "tasks": last - first}),
          flush=True)


def measure(processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the worker as ``processes`` processes; tasks/s and CPU seconds per task over all of them."""
    script = [str(Path(__file__).resolve()), "--worker", "--preset", args.preset, "--device", args.device,
              "--threads", str(args.threads), "--iterations", str(args.iterations),
              "--warmup", str(args.warmup)]
    if args.data_dir:
        script += ["--data-dir", args.data_dir]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    done = subprocess.run(launcher + script, env=env, capture_output=True, text=True, check=False)
    # The ranks print at the same time, so their lines can run into each other: split on the prefix.
    decoder = json.JSONDecoder()
    ranks = [decoder.raw_decode(part)[0] for part in done.stdout.split(RESULT_PREFIX)[1:]]
    if done.returncode != 0 or len(ranks) != processes:
        raise SystemExit(f"{' '.join(launcher + script)} failed:\n{done.stderr[-3000:]}")
    batch = ranks[0]["meta_batch_size"]
    wall = max(r["wall_s_per_iter"] for r in ranks)  # the processes step together
    return {"tasks_per_sec": batch / wall, "cpu_s_per_task": sum(r["cpu_s_per_iter"] for r in ranks) / batch,
            "load_avg_1min": load, "data": ranks[0]["data"]}


def measure_independent(processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """``processes`` single-process workers at once, each on its 1/N of the meta-batch, never exchanging."""
    script = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", args.preset, "--device",
              args.device, "--threads", str(args.threads), "--iterations", str(args.iterations), "--warmup",
              str(args.warmup), "--share", str(processes)]
    if args.data_dir:
        script += ["--data-dir", args.data_dir]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load = os.getloadavg()[0]
    children = [subprocess.Popen(script, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(processes)]
    outputs = [child.communicate() for child in children]
    ranks = []
    for child, (out, err) in zip(children, outputs):
        if child.returncode != 0 or RESULT_PREFIX not in out:
            raise SystemExit(f"{' '.join(script)} failed:\n{err[-3000:]}")
        ranks.append(json.loads(out.split(RESULT_PREFIX, 1)[1].splitlines()[0]))
    # Each process does its share in its own time; together they do the whole meta-batch per step.
    return {"tasks_per_sec": sum(r["tasks"] / r["wall_s_per_iter"] for r in ranks),
            "cpu_s_per_task": sum(r["cpu_s_per_iter"] for r in ranks) / sum(r["tasks"] for r in ranks),
            "load_avg_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="omniglot-maml-5w1s")
    parser.add_argument("--data-dir", default=None, help="folder holding omniglot/ (default: see above)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--processes", default="1,2",
                        help="process counts to compare; the first is the baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--iterations", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time N independent processes (no exchange): the machine's own ceiling")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    counts = [int(n) for n in args.processes.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    independent: dict[int, list[dict[str, Any]]] = {n: [] for n in counts[1:]} if args.ceiling else {}
    for _ in range(args.rounds):
        for n in counts:
            runs[n].append(measure(n, args))
            if n in independent:
                independent[n].append(measure_independent(n, args))
    tasks = {n: statistics.median(r["tasks_per_sec"] for r in runs[n]) for n in counts}
    cpu = {n: statistics.median(r["cpu_s_per_task"] for r in runs[n]) for n in counts}
    base = counts[0]
    result = {
        "benchmark": "distributed",
        "preset": args.preset,
        "device": args.device,
        "data": runs[base][0]["data"],
        "torch": str(torch.__version__),
        "cpu_count": os.cpu_count(),
        "threads_per_process": args.threads,
        "iterations": args.iterations,
        "rounds": args.rounds,
        "tasks_per_sec": {str(n): round(tasks[n], 2) for n in counts},
        "speedup": {str(n): round(tasks[n] / tasks[base], 3) for n in counts},
        "target_speedup_2_processes": TARGET_2_PROCESSES,
        "cpu_s_per_task": {str(n): round(cpu[n], 4) for n in counts},
        "cpu_efficiency": {str(n): round(cpu[base] / cpu[n], 3) for n in counts},
        "load_avg_1min": {str(n): [round(r["load_avg_1min"], 2) for r in runs[n]] for n in counts},
        "per_round_tasks_per_sec": {str(n): [round(r["tasks_per_sec"], 2) for r in runs[n]] for n in counts},
    }
    if independent:
        free = {n: statistics.median(r["tasks_per_sec"] for r in independent[n]) for n in independent}
        result["independent_tasks_per_sec"] = {str(n): round(free[n], 2) for n in free}
        result["ceiling"] = {str(n): round(free[n] / tasks[base], 3) for n in free}
        result["share_of_ceiling"] = {str(n): round(tasks[n] / free[n], 3) for n in free}
        result["independent_cpu_s_per_task"] = {
            str(n): round(statistics.median(r["cpu_s_per_task"] for r in independent[n]), 4) for n in free}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
