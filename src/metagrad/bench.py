"""``metagrad bench``: time the full meta-training step on random data of a preset's shapes.

One iteration is what ``metagrad train`` does per outer step: sample a meta-batch of tasks with
``EpisodeSampler`` (tensor indexing into one uint8 dataset), ``algorithms.meta_train_step`` (the meta-batch
loss, its backward and the Adam step). The dataset is random uint8 images of the preset dataset's image
shape, so no download is needed and the figures do not depend on what the images show.

Reported, after ``warmup`` untimed iterations: the median seconds per iteration, tasks per second, peak
memory (the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and the achieved
GFLOP/s against the GFLOP/s of a float32 matrix product measured in the same process after the timed
iterations. The FLOPs are those of the per-task reference path (``vectorize=False``), counted on one
extra iteration with ``torch.utils.flop_counter.FlopCounterMode``: that is the algorithm's useful work,
the same whatever a fast path does (and the counter ignores ``groups`` in convolution backward, so it
overcounts a vmapped convolution's backward by the number of tasks).

Example:
    >>> from metagrad.training.config import load_preset
    >>> result = run_bench(load_preset("omniglot-maml-5w1s"), iterations=5)
    >>> result["sec_per_iter"], result["peak_mem_mb"]

References:
    benchmarks/compare_learn2learn.py runs this beside learn2learn 0.2.0, interleaved.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import metagrad
from metagrad import _malloc
from metagrad.algorithms import meta_train_step
from metagrad.algorithms.check import ModelCheck, check_model
from metagrad.algorithms.strategies import strategy_for
from metagrad.data.datasets import FewShotDataset
from metagrad.data.episodes import EpisodeSampler
from metagrad.errors import ConfigError
from metagrad.training.config import Config
from metagrad.training.metrics import peak_memory_mb
from metagrad.training.rates import inner_rates
from metagrad.training.schedule import iteration_settings, multi_step_loss_weights
from metagrad.training.setup import Learner, make_model, meta_learned_params, resolve_device

__all__ = ["IMAGE_SHAPES", "check_preset_model", "matmul_gflops", "run_bench"]

IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "omniglot": (1, 28, 28), "mini-imagenet": (3, 84, 84), "cifar-fs": (3, 32, 32), "fc100": (3, 32, 32),
    "tiered-imagenet": (3, 84, 84), "cub": (3, 84, 84),
}
"""(C, H, W) of each dataset's images as the models take them."""

RANDOM_CLASSES = 64
"""Classes in the random dataset: enough for any preset's ways, small enough (27 MB at 3x84x84 with 20
images per class) that the dataset barely shows in peak memory."""

RANDOM_IMAGES_PER_CLASS = 20
"""Images per class in the random dataset (Omniglot's count); raised to shots + query_shots if needed."""

MATMUL_SIZE = 2048
"""Side of the square float32 matrices whose product gives the peak GFLOP/s."""


def matmul_gflops(device: torch.device, *, size: int = MATMUL_SIZE, repeats: int = 10) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` float32 matrix product on ``device`` (after one warm-up)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_dataset(config: Config, generator: torch.Generator) -> FewShotDataset:
    data = config.data
    if data.dataset not in IMAGE_SHAPES:
        raise ConfigError(f"bench: unknown dataset {data.dataset!r}; valid: {', '.join(IMAGE_SHAPES)}")
    classes = max(RANDOM_CLASSES, data.ways)
    per_class = max(RANDOM_IMAGES_PER_CLASS, data.shots + data.query_shots)
    images = torch.randint(0, 256, (classes, per_class, *IMAGE_SHAPES[data.dataset]),
                           dtype=torch.uint8, generator=generator)  # (classes, samples, C, H, W)
    return FewShotDataset(data.dataset, "train", images, [f"random-{i}" for i in range(classes)])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's (often vaguer) answer
        pass
    return platform.processor() or platform.machine()


def run_bench(
    config: Config,
    *,
    iterations: int = 20,
    warmup: int = 3,
    json_output: bool = False,
    count_flops: bool = True,
    report: bool = True,
    matmul_size: int = MATMUL_SIZE,
) -> dict[str, Any]:
    """Time ``iterations`` meta-training steps of ``config``'s shapes after ``warmup`` untimed ones.

    Taken from the config: data (dataset, ways, shots, query_shots), model, meta (algorithm, first_order,
    inner_lr, inner_steps, meta_lr, meta_batch_size, vectorize, learned_inner_lr, and the settings of the
    first iteration under MAML++'s schedules: its multi-step loss weights, its derivative order), run
    (seed, device).

    Args:
        config: a resolved configuration, e.g. ``load_preset("omniglot-maml-5w1s")``.
        iterations: timed iterations; the median is reported.
        warmup: untimed iterations first (allocator warm-up, lazy initialisation, compilation).
        json_output: print the result as one JSON object on the last line.
        count_flops: count one extra iteration's FLOPs and measure the matrix-product peak.
        report: print a human-readable summary to stdout (the CLI does; tests need not).
        matmul_size: side of the float32 matrix product that gives the peak GFLOP/s.

    Returns:
        JSON-ready dict with at least ``sec_per_iter``, ``tasks_per_sec``, ``peak_mem_mb``, plus
        ``gflop_per_iter``, ``gflops``, ``matmul_gflops`` and ``peak_fraction`` (None without
        ``count_flops``), ``times`` (each timed iteration) and the timed shapes.

    Raises:
        ConfigError: ``iterations < 1`` or ``warmup < 0``, or a dataset without a known image shape.
    """
    if iterations < 1 or warmup < 0:
        raise ConfigError(f"bench: need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    data, meta = config.data, config.meta
    device = resolve_device(config.run.device)
    torch.manual_seed(config.run.seed)
    generator = torch.Generator().manual_seed(config.run.seed)
    dataset = _random_dataset(config, generator)
    sampler = EpisodeSampler(dataset, data.ways, data.train_shots or data.shots, data.query_shots,
                             device=device)
    model = make_model(config.model, data.ways, dataset.image_shape).to(device)
    params = meta_learned_params(model, meta)  # with MAML++'s per-step BatchNorm copies if asked, as training
    rates = inner_rates(meta, params, config.run.seed)  # learned inner rates (Meta-SGD, LSLR), as training
    learner = Learner(model, params, {}, rates)
    optimizer = learner.optimizer(meta)
    first = iteration_settings(meta, 1)  # the first iteration's derivative order (MAML++'s DA)
    step_weights = multi_step_loss_weights(meta, 1)  # and its multi-step loss (MAML++'s MSL)
    algorithm = learner.algorithm(first, step_weights=step_weights)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(vectorize: bool = meta.vectorize) -> None:
        episode = sampler.sample(meta.meta_batch_size, generator)
        meta_train_step(algorithm, model, optimizer, episode, vectorize=vectorize,
                        max_tasks_per_chunk=meta.tasks_per_chunk or None, params=params)

    before_mb = peak_memory_mb(device)  # on CPU the process's high-water mark so far (a --check, say)
    times = []
    for i in range(warmup + iterations):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak_mb = peak_memory_mb(device)  # before the FLOP count and the matmul, which allocate on their own
    sec = statistics.median(times)

    gflop = gflops = peak = None
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            step(vectorize=False)
        gflop = counter.get_total_flops() / 1e9
        gflops = gflop / sec
        peak = matmul_gflops(device, size=matmul_size)

    result: dict[str, Any] = {
        "preset": config.preset,
        "algorithm": meta.algorithm,
        "model": config.model.name,
        "dataset": data.dataset,
        "ways": data.ways,
        "shots": data.shots,
        "query_shots": data.query_shots,
        "meta_batch_size": meta.meta_batch_size,
        "inner_steps": meta.inner_steps,
        "inner_lr": meta.inner_lr,
        "first_order": algorithm.first_order,
        "learned_inner_lr": meta.learned_inner_lr,
        "multi_step_loss": step_weights is not None,
        "vectorize": meta.vectorize,
        "tasks_per_chunk": meta.tasks_per_chunk,
        "per_step_bn": meta.per_step_bn,
        "strategy": strategy_for(algorithm, model, params,
                                 dict(model.named_buffers()), vectorize=meta.vectorize),
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        # how idle OpenMP threads wait (None, None: libgomp's default); see metagrad/_openmp.py
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "malloc": _malloc.applied(),  # the C allocator setting in force (metagrad/_malloc.py), None: glibc's
        # above the CPU count: other jobs shared the cores, times are inflated
        "load_avg": os.getloadavg()[0],
        "torch": torch.__version__,
        "metagrad": metagrad.__version__,
        "iterations": iterations,
        "warmup": warmup,
        "sec_per_iter": sec,
        "tasks_per_sec": meta.meta_batch_size / sec,
        "peak_mem_mb": peak_mb,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "peak_mem_before_steps_mb": before_mb,
        "gflop_per_iter": gflop,
        "gflops": gflops,
        "matmul_gflops": peak,
        "matmul_size": matmul_size,
        "peak_fraction": None if gflops is None else gflops / peak,
        "times": times,
    }
    if report:
        _print_report(result)
    if json_output:
        print(json.dumps(result), flush=True)
    return result


def check_preset_model(config: Config) -> ModelCheck:
    """``check_model`` on ``config``'s model, algorithm, ways, shots and inner steps (3 random tasks)."""
    data, meta = config.data, config.meta
    if data.dataset not in IMAGE_SHAPES:
        raise ConfigError(f"bench: unknown dataset {data.dataset!r}; valid: {', '.join(IMAGE_SHAPES)}")
    torch.manual_seed(config.run.seed)
    model = make_model(config.model, data.ways, IMAGE_SHAPES[data.dataset])
    return check_model(model, IMAGE_SHAPES[data.dataset], algorithm=meta.algorithm, ways=data.ways,
                       shots=data.shots, query_shots=data.query_shots, tasks=3, inner_lr=meta.inner_lr,
                       inner_steps=meta.inner_steps, seed=config.run.seed)


def _print_report(r: dict[str, Any]) -> None:
    order = "first" if r["first_order"] else "second"
    print(f"{r['preset']}: {r['algorithm']} {order} order, {r['dataset']} {r['ways']}-way {r['shots']}-shot "
          f"{r['query_shots']} query, meta-batch {r['meta_batch_size']}, {r['inner_steps']} inner step(s), "
          f"{r['strategy']} strategy")
    policy = " ".join(f"{name}={r[key]}" for name, key in (("OMP_WAIT_POLICY", "omp_wait_policy"),
                                                          ("GOMP_SPINCOUNT", "gomp_spincount")) if r[key])
    print(f"device {r['device']} ({r['device_name']}), {r['threads']} threads "
          f"(OpenMP wait: {policy or 'libgomp default'}; malloc: {r['malloc'] or 'glibc default'}), "
          f"torch {r['torch']}, "
          f"load average {r['load_avg']:.1f} on {os.cpu_count()} CPUs")
    print(f"sec/iter {r['sec_per_iter']:.4f} (median of {r['iterations']}, min {min(r['times']):.4f}), "
          f"tasks/s {r['tasks_per_sec']:.1f}, peak memory {r['peak_mem_mb']:.0f} MB ({r['peak_mem_kind']})")
    if r["peak_mem_mb"] <= r["peak_mem_before_steps_mb"]:
        print("  (reached before the timed steps, by the process's earlier work such as --check: the steps' "
              "own peak is lower; run without --check to measure it)")
    if r["gflops"] is not None:
        print(f"{r['gflop_per_iter']:.2f} GFLOP/iter, {r['gflops']:.1f} GFLOP/s = "
              f"{100 * r['peak_fraction']:.0f}% of the {r['matmul_gflops']:.0f} GFLOP/s "
              f"{r['matmul_size']}x{r['matmul_size']} float32 matmul")
