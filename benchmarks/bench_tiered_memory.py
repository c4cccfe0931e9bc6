"""Peak memory of tiered-ImageNet: decoding Ren et al.'s PNG pickle into the memory-mapped cache, then
sampling tasks from it, against the same sampling from the split read into memory.

Generates a tiered-ImageNet-format split of ``--gigabytes`` of decoded pixels (random 84x84 RGB PNGs,
classes of 732 to 1300 images as in the real split, streamed into the pickle so the generator holds one
batch of images), then runs each phase in a fresh process and reads its peak RSS (``ru_maxrss``):

- ``import``: Python, torch and metagrad alone (the floor under every other number);
- ``build``: ``load_dataset`` decoding the pickle into the cache;
- ``mapped``: ``EpisodeSampler`` drawing ``--batches`` meta-batches from the mapped cache, pages released
  after each (what training does);
- ``mapped_kept``: the same without releasing pages, to show what the release buys;
- ``in_memory``: the same from the split read into memory whole (the baseline).

Prints one JSON line. The fixture is deleted at the end (``--keep`` keeps it).

    python benchmarks/bench_tiered_memory.py --gigabytes 3 --dir /tmp/tiered-bench
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIDE = 84
IMAGE_BYTES = 3 * SIDE * SIDE


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _write_fixture(root: Path, gigabytes: float) -> int:
    """``train_images_png.pkl`` and ``train_labels.pkl`` (and tiny validation/test ones); returns images."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    total = int(gigabytes * 1e9) // IMAGE_BYTES
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(732, 1301)))
    sizes[-1] -= sum(sizes) - total
    if sizes[-1] < 1:
        sizes.pop()
        total = sum(sizes)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)  # classes interleaved in the file, as a real file need not keep them together
    # A pool of distinct PNGs, reused: encoding 100k+ random images would dominate the fixture's time.
    pool = []
    for i in range(512):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        pixels[0, 0] = (i % 256, i // 256, 7)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        pool.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train_images_png.pkl", "wb") as f:
        # a pickled list written batch by batch: PROTO 2, EMPTY_LIST, then MARK items APPENDS per batch.
        # Protocol 2 names its memo slots (BINPUT i), so each array's own pickle can be spliced in.
        f.write(b"\x80\x02]")
        for start in range(0, total, 1000):
            f.write(b"(")
            for i in range(start, min(start + 1000, total)):
                f.write(pickle.dumps(pool[i % len(pool)], protocol=2)[2:-1])  # the array without PROTO/STOP
            f.write(b"e")
        f.write(b".")
    with open(root / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": labels.astype(np.int64)}, f, protocol=4)
    for short, classes in (("val", 97), ("test", 160)):  # small stand-ins, so the folder is complete
        ids = np.repeat(np.arange(classes), 2)
        with open(root / f"{short}_images_png.pkl", "wb") as f:
            pickle.dump([pool[i % len(pool)] for i in range(len(ids))], f, protocol=4)
        with open(root / f"{short}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": ids}, f, protocol=4)
    return total


def _child(mode: str, data: str, cache: str, batches: int) -> dict:
    import numpy as np
    import torch

    from metagrad.data import EpisodeSampler, FewShotDataset, load_dataset, tieredimagenet

    if mode == "import":
        return {"peak_rss_mb": _peak_rss_mb()}
    classes = len(np.unique(_labels(data)))  # the fixture's, not the real split's 351
    tieredimagenet.OFFICIAL_COUNTS = tieredimagenet.Counts((("train", classes),
                                                            ("validation", 97), ("test", 160)))
    start = time.perf_counter()
    split = load_dataset("tiered-imagenet", "train", data_dir=data, cache_dir=cache)
    if mode == "build":
        return {"peak_rss_mb": _peak_rss_mb(), "seconds": time.perf_counter() - start,
                "images": split.images.shape[0]}
    if mode == "in_memory":  # the file read into memory (read(), not the map: no mapped pages counted)
        pixels = np.fromfile(next(Path(cache).glob("tiered-imagenet-train-*.u8")), dtype=np.uint8)
        split = FewShotDataset(split.name, split.split, torch.from_numpy(pixels).view(split.images.shape),
                               split.class_names, split.class_sizes)
    elif mode == "mapped_kept":
        split = FewShotDataset(split.name, split.split, split.images, split.class_names, split.class_sizes)
    sampler = EpisodeSampler(split, ways=5, shots=5, query_shots=15)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(batches):
        sampler.sample(4, generator)  # the 5-shot presets' meta-batch: 4 x 5 x 20 = 400 images
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": _peak_rss_mb(), "sec_per_batch": seconds / batches}


def _labels(data: str):
    import numpy as np

    with open(Path(data) / "tiered-imagenet" / "train_labels.pkl", "rb") as f:
        return np.asarray(pickle.load(f)["label_specific"])  # our own fixture: plain pickle is safe here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=3.0, help="decoded size of the train split")
    parser.add_argument("--batches", type=int, default=2000, help="meta-batches sampled per phase")
    parser.add_argument("--dir", default="/tmp/metagrad-tiered-bench", help="fixture and cache folder")
    parser.add_argument("--keep", action="store_true", help="keep the fixture and cache")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = Path(args.dir)
    data, cache = base / "data", base / "cache"
    if args.child:
        print(json.dumps(_child(args.child, str(data), str(cache), args.batches)))
        return
    try:
        start = time.perf_counter()
        images = _write_fixture(data / "tiered-imagenet", args.gigabytes)
        fixture_s = time.perf_counter() - start
        phases = {}
        for mode in ("import", "build", "mapped", "mapped_kept", "in_memory"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(base),
                                  "--batches", str(args.batches)], check=True, capture_output=True, text=True)
            phases[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        import torch

        cache_bytes = sum(p.stat().st_size for p in cache.glob("*.u8") if "train" in p.name)
        print(json.dumps({
            "benchmark": "tiered_memory", "device": "cpu", "torch": torch.__version__, "images": images,
            "cache_mb": round(cache_bytes / 2**20), "pickle_mb": round(
                (data / "tiered-imagenet" / "train_images_png.pkl").stat().st_size / 2**20),
            "fixture_s": round(fixture_s, 1),
            "batches": args.batches, "meta_batch": "4 tasks x 5-way x (5 + 15) images",
            **{f"{mode}_{key}": round(value, 4 if key == "sec_per_batch" else 1)
               for mode, facts in phases.items() for key, value in facts.items() if key != "images"},
            "mapped_peak_over_cache": round(phases["mapped"]["peak_rss_mb"] / (cache_bytes / 2**20), 3),
            "in_memory_peak_over_mapped_peak": round(phases["in_memory"]["peak_rss_mb"]
                                                     / phases["mapped"]["peak_rss_mb"], 2),
        }))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
