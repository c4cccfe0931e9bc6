"""``l2l.vision``: the standard few-shot networks, datasets, transforms and benchmark task sets."""

from metagrad.compat.learn2learn.vision import benchmarks, datasets, models, transforms

__all__ = ["benchmarks", "datasets", "models", "transforms"]
