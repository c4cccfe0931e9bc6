"""Few-shot data: datasets decoded once into uint8 tensors, and vectorized N-way K-shot task sampling."""

from metagrad.data.datasets import (
    DATASETS,
    SPLITS,
    FewShotDataset,
    dataset_info,
    download,
    load_dataset,
    resolve_cache_dir,
    resolve_data_dir,
)
from metagrad.data.episodes import EpisodeSampler

__all__ = [
    "DATASETS",
    "SPLITS",
    "EpisodeSampler",
    "FewShotDataset",
    "dataset_info",
    "download",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_dir",
]
