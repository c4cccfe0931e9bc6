"""``l2l.data``: MetaDataset over any (sample, label) dataset, task transforms with learn2learn's semantics,
and the tensor fast path of a Taskset over a metagrad dataset."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import metagrad.compat.learn2learn as l2l
from metagrad.data.datasets import FewShotDataset

T = l2l.data.transforms


def _encoded(classes: int = 12, per_class: int = 6, side: int = 4) -> FewShotDataset:
    """Image (c, s) has pixel (0, 0) = 10 * c + s, pixel (0, 1) = 255 and the rest 0 (so rotations show)."""
    images = torch.zeros(classes, per_class, 1, side, side, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = (torch.arange(classes)[:, None] * 10 + torch.arange(per_class)).to(torch.uint8)
    images[:, :, 0, 0, 1] = 255
    return FewShotDataset("tiny", "train", images, [f"c{i}" for i in range(classes)])


def _origin(image: torch.Tensor) -> tuple[int, int]:
    """(class, sample) of an image of ``_encoded``, whichever quarter turn it was given."""
    for turns in range(4):
        upright = torch.rot90(image, -turns, dims=(-2, -1))
        if upright[0, 0, 1] == 1.0:
            return divmod(round(upright[0, 0, 0].item() * 255), 10)
    raise AssertionError("not an image of _encoded")


def test_meta_dataset_accepts_any_indexable_pairs() -> None:
    pairs = [(torch.tensor([float(i)]), "ab"[i % 2]) for i in range(6)]
    dataset = l2l.data.MetaDataset(pairs)
    assert dataset.labels == ["a", "b"] and dataset.labels_to_indices == {"a": [0, 2, 4], "b": [1, 3, 5]}
    assert dataset.indices_to_labels[3] == "b" and len(dataset) == 6 and dataset[1] is pairs[1]

    tensors = l2l.data.MetaDataset(TensorDataset(torch.randn(5, 2), torch.tensor([3, 1, 3, 1, 2])))
    assert sorted(tensors.labels) == [1, 2, 3] and all(isinstance(k, int) for k in tensors.labels)

    images = l2l.data.MetaDataset(_encoded(classes=3, per_class=2))
    assert images.labels == [0, 1, 2] and images.labels_to_indices[2] == [4, 5]
    image, label = images[5]
    assert label == 2 and image.shape == (1, 4, 4) and _origin(image) == (2, 1)

    relabelled = l2l.data.MetaDataset(l2l.data.ClassImages(_encoded(classes=3, per_class=2).images,
                                                           target_transform=lambda c: f"class{c}"))
    assert relabelled.labels == ["class0", "class1", "class2"]  # the bookkeeping sees target_transform

    with pytest.raises(TypeError, match="indexable dataset"):
        l2l.data.MetaDataset(42)
    with pytest.raises(ValueError, match="one scalar label"):
        l2l.data.MetaDataset(TensorDataset(torch.randn(3, 2), torch.zeros(3, 2)))


def _check_task(data: torch.Tensor, labels: torch.Tensor, ways: int, shots: int, consecutive: bool) -> None:
    assert data.shape == (ways * shots, 1, 4, 4) and labels.shape == (ways * shots,)
    origins = [_origin(x) for x in data]
    classes = [c for c, _ in origins]
    groups = [classes[i * shots] for i in range(ways)]
    assert classes == [c for c in groups for _ in range(shots)]  # each class's samples consecutive
    assert len(set(groups)) == ways and len(set(origins)) == ways * shots  # distinct classes and images
    if consecutive:
        assert groups == sorted(groups)
    assert labels.view(ways, shots).unique(dim=1).shape == (ways, 1)  # one label per group
    assert sorted(labels[::shots].tolist()) == list(range(ways))  # remapped to 0..ways-1


@pytest.mark.parametrize("fast", [True, False])
def test_standard_pipeline_fast_and_per_sample_paths(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = l2l.data.MetaDataset(_encoded())
    transforms = [T.FusedNWaysKShots(dataset, n=5, k=3, filter_labels=list(range(1, 12))),
                  T.LoadData(dataset),
                  T.RemapLabels(dataset), T.ConsecutiveLabels(dataset),
                  l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0])]
    # An explicit collate function is an unknown pipeline to the fast path: the per-sample path runs.
    taskset = l2l.data.Taskset(dataset, transforms, num_tasks=50,
                               task_collate=None if fast else torch.utils.data.default_collate)
    assert (taskset._fast is not None) == fast
    if fast:  # the fast path never loads an image by itself
        monkeypatch.setattr(l2l.data.ClassImages, "__getitem__", lambda *_: pytest.fail("loaded one image"))
    random.seed(0)
    tasks = [taskset.sample() for _ in range(40)]
    for data, labels in tasks:
        _check_task(data, labels, ways=5, shots=3, consecutive=True)
        assert 0 not in {_origin(x)[0] for x in data}  # filter_labels
    turns = set()
    for data, _ in tasks:
        for x in data[::3]:
            turns.update(t for t in range(4) if torch.rot90(x, -t, dims=(-2, -1))[0, 0, 1] == 1.0)
    assert turns == {0, 1, 2, 3}
    assert torch.equal(taskset[7][0], taskset[7][0])  # a fixed pool: task 7 is always the same
    collate = taskset.task_collate if not fast else None
    runs = []
    for _ in range(2):  # random.seed reproduces the tasks of a new task set
        random.seed(1)
        fresh = l2l.data.Taskset(dataset, transforms, num_tasks=-1, task_collate=collate)
        runs.append([fresh.sample()[0] for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and not torch.equal(runs[0][0], runs[0][1])


def test_fast_path_layouts_follow_learn2learn() -> None:
    dataset = l2l.data.MetaDataset(_encoded())
    random.seed(0)
    for fast in (True, False):  # the per-sample path is learn2learn's semantics; the fast path must agree
        collate = None if fast else torch.utils.data.default_collate
        nk = l2l.data.Taskset(dataset, [T.NWays(dataset, 2), T.KShots(dataset, 2), T.LoadData(dataset)],
                              task_collate=collate)
        filtered = l2l.data.Taskset(dataset, [T.FilterLabels(dataset, list(range(8))), T.NWays(dataset, 4),
                                              T.KShots(dataset, 2), T.LoadData(dataset)],
                                    task_collate=collate)
        assert (nk._fast is not None) == (filtered._fast is not None) == fast
        orders = set()
        for _ in range(20):
            data, labels = nk.sample()  # NWays draws classes in random order; labels are the original ones
            classes = [_origin(x)[0] for x in data]
            assert labels.tolist() == classes
            orders.add(classes == sorted(classes))
            data, labels = filtered.sample()  # after FilterLabels, NWays keeps the dataset's order
            classes = [_origin(x)[0] for x in data]
            assert labels.tolist() == classes and classes == sorted(classes) and max(classes) < 8
        assert orders == {True, False}
    fused = l2l.data.Taskset(dataset, [T.FusedNWaysKShots(dataset, 2, 2), T.LoadData(dataset),
                                       T.RemapLabels(dataset, shuffle=False)])
    assert fused._fast is not None
    orders = set()
    for _ in range(20):
        data, labels = fused.sample()
        classes = [_origin(x)[0] for x in data[::2]]
        assert labels[::2].tolist() == [sorted(classes).index(c) for c in classes]
        orders.add(classes == sorted(classes))
    assert orders == {True, False}  # without ConsecutiveLabels, classes come in drawn order
    shuffled = l2l.data.Taskset(dataset, [T.FusedNWaysKShots(dataset, 2, 2), T.LoadData(dataset),
                                          T.RemapLabels(dataset)])
    # RemapLabels numbers the classes at random, apart from the order they come in (learn2learn shuffles)
    assert {tuple(shuffled.sample()[1][::2].tolist()) for _ in range(20)} == {(0, 1), (1, 0)}
    unknown = l2l.data.Taskset(dataset, [T.FusedNWaysKShots(dataset, 4, 2, replacement=True),
                                         T.LoadData(dataset)])
    assert unknown._fast is None  # with replacement: the per-sample path


def test_tasksets_pickle_and_load_in_workers() -> None:
    dataset = l2l.data.MetaDataset(_encoded())
    for collate in (None, torch.utils.data.default_collate):  # fast and per-sample paths
        taskset = l2l.data.Taskset(dataset, [T.NWays(dataset, 3), T.KShots(dataset, 2), T.LoadData(dataset),
                                             T.RemapLabels(dataset)], num_tasks=8, task_collate=collate)
        clone = pickle.loads(pickle.dumps(taskset))
        assert clone[0][0].shape == (6, 1, 4, 4)
        loader = DataLoader(taskset, batch_size=4, num_workers=2)
        batches = list(loader)
        assert len(batches) == 2 and batches[0][0].shape == (4, 6, 1, 4, 4)


def test_transform_errors_name_the_problem() -> None:
    dataset = l2l.data.MetaDataset(_encoded(classes=3, per_class=2))
    with pytest.raises(ValueError, match="NWays needs 4 labels"):
        l2l.data.Taskset(dataset, [T.NWays(dataset, 4), T.LoadData(dataset)], task_collate=list).sample()
    with pytest.raises(ValueError, match="KShots needs 3 samples of label 0"):
        l2l.data.Taskset(dataset, [T.KShots(dataset, 3), T.LoadData(dataset)]).sample()
    with pytest.raises(ValueError, match="FusedNWaysKShots needs 5 labels"):
        l2l.data.Taskset(dataset, [T.FusedNWaysKShots(dataset, 5, 1), T.LoadData(dataset)]).sample()
    with pytest.raises(ValueError, match="not labels of the dataset"):
        T.FusedNWaysKShots(dataset, 2, 1, filter_labels=[7])
    with pytest.raises(ValueError, match="multiples of 90"):
        l2l.vision.transforms.RandomClassRotation(dataset, [0, 45])
    with pytest.raises(ValueError, match="num_tasks"):
        l2l.data.Taskset(dataset, [], num_tasks=0)
    l2l.data.TaskDataset._warned = False
    with pytest.warns(DeprecationWarning, match="Taskset"):
        l2l.data.TaskDataset(dataset, [T.LoadData(dataset)])


def test_partition_task() -> None:
    data = torch.arange(12.0)[:, None]
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    (sx, sy), (qx, qy) = l2l.data.partition_task(data, labels, shots=1)
    assert sy.tolist() == [0, 1, 2] and sx.flatten().tolist() == [1, 2, 0]
    assert qy.tolist() == [0] * 3 + [1] * 3 + [2] * 3 and qx.flatten().tolist()[:3] == [4, 7, 10]
    with pytest.raises(ValueError, match="same number of samples per label"):
        l2l.data.partition_task(data[:5], labels[:5])


def test_union_and_filtered_meta_datasets() -> None:
    first = l2l.data.MetaDataset([(torch.tensor([float(i)]), "ab"[i % 2]) for i in range(4)])
    second = l2l.data.MetaDataset(TensorDataset(torch.arange(6.0)[:, None], torch.tensor([7, 7, 3, 3, 7, 3])))
    union = l2l.data.UnionMetaDataset([first, second])
    # learn2learn's renumbering: each dataset's labels after the previous ones', in its labels' order
    assert union.labels_to_indices == {0: [0, 2], 1: [1, 3], 2: [4, 5, 8], 3: [6, 7, 9]}
    assert len(union) == 10 and union[6][1] == 3 and union[6][0].item() == 2.0 and union[1][0].item() == 1.0
    with pytest.raises(IndexError, match="out of range"):
        union[10]
    filtered = l2l.data.FilteredMetaDataset(second, [3, 7])
    assert filtered.labels == [3, 7] and filtered.labels_to_indices == {3: [0, 1, 2], 7: [3, 4, 5]}
    assert [filtered[i][0].item() for i in range(6)] == [2.0, 3.0, 5.0, 0.0, 1.0, 4.0]
    with pytest.raises(ValueError, match=r"labels \[5\] are not in the dataset"):
        l2l.data.FilteredMetaDataset(second, [3, 5])
    # both serve task transforms like any MetaDataset
    tasks = l2l.data.Taskset(filtered, [T.NWays(filtered, 2), T.KShots(filtered, 2), T.LoadData(filtered)])
    data, labels = tasks.sample()
    assert data.shape == (4, 1) and sorted(labels.tolist()) == [3, 3, 7, 7]


def test_on_device_dataset_stacks_the_samples() -> None:
    pairs = [(torch.full((1, 2, 2), float(i)), torch.tensor(i % 3)) for i in range(9)]
    dataset = l2l.data.OnDeviceDataset(pairs, device="cpu", transform=lambda x: x + 100)
    data, labels = dataset.tensors
    assert data.shape == (9, 1, 2, 2) and labels.tolist() == [i % 3 for i in range(9)]
    assert torch.equal(data[4], pairs[4][0])  # stored as given; the transform acts on access
    x, y = dataset[4]
    assert torch.equal(x, pairs[4][0] + 100) and y.item() == 1 and len(dataset) == 9
    meta = l2l.data.MetaDataset(dataset)  # labels read from the label tensor, not item by item
    assert meta.labels_to_indices == {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]}
    # a metagrad image tensor converts in one operation, to what its items are one by one
    images = l2l.data.ClassImages(_encoded().images)
    whole = l2l.data.OnDeviceDataset(images)
    assert torch.equal(whole.tensors[0], torch.stack([images[i][0] for i in range(len(images))]))
    assert whole.tensors[1].tolist() == [images[i][1] for i in range(len(images))]
    meta = l2l.data.MetaDataset(whole)
    tasks = l2l.data.Taskset(meta, [T.NWays(meta, 3), T.KShots(meta, 2), T.LoadData(meta)])
    data, labels = tasks.sample()
    assert data.shape == (6, 1, 4, 4) and labels.unique().numel() == 3


def test_on_device_dataset_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="empty"):
        l2l.data.OnDeviceDataset([])
    with pytest.raises(TypeError, match="sample 1 is a list"):
        l2l.data.OnDeviceDataset([(torch.zeros(2), 0), ([0.0, 1.0], 1)])
    with pytest.raises(ValueError, match=r"sample 0 is \(2,\), sample 1 is \(3,\)"):
        l2l.data.OnDeviceDataset([(torch.zeros(2), 0), (torch.zeros(3), 1)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_device_dataset_on_cuda() -> None:
    dataset = l2l.data.OnDeviceDataset(l2l.data.ClassImages(_encoded().images), device="cuda")
    assert dataset.tensors[0].is_cuda and dataset.tensors[1].is_cuda
    assert dataset[5][0].is_cuda
