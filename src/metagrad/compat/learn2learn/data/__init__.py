"""``l2l.data``: datasets of labelled samples and the task sets drawn from them."""

from metagrad.compat.learn2learn._missing import missing_names
from metagrad.compat.learn2learn.data import transforms
from metagrad.compat.learn2learn.data.description import DataDescription
from metagrad.compat.learn2learn.data.meta_dataset import (
    ClassImages,
    FilteredMetaDataset,
    MetaDataset,
    UnionMetaDataset,
)
from metagrad.compat.learn2learn.data.task_dataset import TaskDataset, Taskset
from metagrad.compat.learn2learn.data.utils import InfiniteIterator, OnDeviceDataset, partition_task

__all__ = ["ClassImages", "DataDescription", "FilteredMetaDataset", "InfiniteIterator", "MetaDataset",
           "OnDeviceDataset", "TaskDataset", "Taskset", "UnionMetaDataset", "partition_task", "transforms"]

__getattr__ = missing_names(__name__, {})
