"""Time EpisodeSampler on an Omniglot-sized split: a meta-batch of 32 5-way 1-shot tasks by default.

Uses the real Omniglot train split (4400 classes with rotations) when it is found (--data-dir, else
$METAGRAD_DATA, else ../shared/data beside the checkout); otherwise a random uint8 tensor of the
same shape, which costs exactly the same to sample from. Prints one JSON line.

    python benchmarks/bench_sampling.py [--device cuda] [--meta-batch-size 32] [--ways 5] [--shots 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from metagrad.data import EpisodeSampler, FewShotDataset, load_dataset
from metagrad.errors import DataError

OMNIGLOT_TRAIN_SHAPE = (4400, 20, 1, 28, 28)  # 1100 characters x 4 rotations


def omniglot_train(data_dir: str | None, cache_dir: str | None) -> tuple[FewShotDataset, str]:
    candidates = [data_dir, os.environ.get("METAGRAD_DATA"),
                  str(Path(__file__).resolve().parents[2] / "shared" / "data")]
    for candidate in filter(None, candidates):
        try:
            return load_dataset("omniglot", "train", data_dir=candidate, cache_dir=cache_dir,
                                download=False), candidate
        except DataError:
            continue
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, OMNIGLOT_TRAIN_SHAPE, dtype=torch.uint8, generator=g)
    return FewShotDataset("omniglot-random", "train", images), "random uint8 of the real shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query-shots", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200, help="timed meta-batches (after 10 warm-up ones)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset, source = omniglot_train(args.data_dir, args.cache_dir)
    device = torch.device(args.device)
    sampler = EpisodeSampler(dataset, args.ways, args.shots, args.query_shots, device=device)
    generator = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(10):
        sampler.sample(args.meta_batch_size, generator)
    sync()
    start = time.perf_counter()
    for _ in range(args.repeats):
        episode = sampler.sample(args.meta_batch_size, generator)
    sync()
    seconds = (time.perf_counter() - start) / args.repeats

    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is KiB on Linux
    print(json.dumps({
        "benchmark": "episode_sampling",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": source,
        "dataset_shape": list(dataset.images.shape),
        "meta_batch_size": args.meta_batch_size,
        "ways": args.ways, "shots": args.shots, "query_shots": args.query_shots,
        "support_shape": list(episode.support_x.shape),
        "sec_per_iter": round(seconds, 6),
        "ms_per_task": round(1000 * seconds / args.meta_batch_size, 4),
        "peak_memory_mb": round(peak / 2**20, 1),
    }))


if __name__ == "__main__":
    main()
