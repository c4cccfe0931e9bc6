"""``l2l.data``: datasets of labelled samples and the task sets drawn from them."""

from metagrad.compat.learn2learn._missing import missing_names
from metagrad.compat.learn2learn.data import transforms
from metagrad.compat.learn2learn.data.description import DataDescription
from metagrad.compat.learn2learn.data.meta_dataset import ClassImages, MetaDataset
from metagrad.compat.learn2learn.data.task_dataset import TaskDataset, Taskset
from metagrad.compat.learn2learn.data.utils import InfiniteIterator, partition_task

__all__ = ["ClassImages", "DataDescription", "InfiniteIterator", "MetaDataset", "TaskDataset", "Taskset",
           "partition_task", "transforms"]


_NOT_PROVIDED = {
    "UnionMetaDataset": "concatenate the datasets' images into one tensor and wrap it in "
                        "l2l.data.ClassImages",
    "FilteredMetaDataset": "pass filter_labels to FusedNWaysKShots, or use FilterLabels, on the whole "
                           "MetaDataset",
    "OnDeviceDataset": "l2l.vision.benchmarks.get_tasksets(..., device=...) keeps the images on the device",
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
