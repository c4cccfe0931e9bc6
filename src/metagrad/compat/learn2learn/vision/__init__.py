"""``l2l.vision``: the standard few-shot networks and benchmark task sets."""

from metagrad.compat.learn2learn.vision import benchmarks, models

__all__ = ["benchmarks", "models"]
