"""``l2l.vision``: learn2learn's model constructors and ``get_tasksets`` over metagrad's datasets."""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from repo_scripts import load_script
from torch import nn

import metagrad.compat.learn2learn as l2l
from metagrad.data import cifarfs, cub, datasets, fc100, miniimagenet, omniglot, tieredimagenet
from metagrad.data.datasets import FewShotDataset
from metagrad.errors import ConfigError
from metagrad.models import HEAD_PREFIX


def test_models_have_learn2learn_signatures() -> None:
    cnn = l2l.vision.models.OmniglotCNN(5)
    assert cnn(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    assert cnn.features[0].conv.stride == (2, 2)  # learn2learn's OmniglotCNN is the strided MAML network
    assert l2l.vision.models.OmniglotCNN(output_size=4, hidden_size=16, layers=3).classifier.in_features == 16

    fc = l2l.vision.models.OmniglotFC(28**2, 5)
    assert fc(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    assert [m.out_features for m in fc.modules() if isinstance(m, nn.Linear)] == [256, 128, 64, 64, 5]
    small = l2l.vision.models.OmniglotFC(input_size=64, output_size=3, sizes=[16, 8])
    assert small(torch.rand(2, 64)).shape == (2, 3)

    mini = l2l.vision.models.MiniImagenetCNN(5)  # learn2learn 0.2.0: MiniImagenetCNN = CNN4, 64 filters
    assert l2l.vision.models.MiniImagenetCNN is l2l.vision.models.CNN4
    assert mini.features(torch.rand(2, 3, 84, 84)).shape == (2, 1600)
    narrow = l2l.vision.models.MiniImagenetCNN(output_size=5, hidden_size=16, layers=4)
    assert narrow.classifier.in_features == 400 and narrow(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    # anil_fc100.py's network: 32x32 inputs, so the embedding is 2 * 2 * 64
    fc100 = l2l.vision.models.CNN4(output_size=5, hidden_size=64, embedding_size=64 * 4)
    assert fc100(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    strided = l2l.vision.models.CNN4(3, hidden_size=8, layers=3, channels=1, max_pool=False,
                                     embedding_size=8 * 16)
    assert strided(torch.rand(2, 1, 28, 28)).shape == (2, 3)  # 28-14-7-4
    with pytest.raises(ConfigError, match="layers=3 or 4"):
        l2l.vision.models.CNN4(5, layers=5)
    for model in (cnn, fc, mini, fc100):
        assert isinstance(model.features, nn.Module) and isinstance(model.classifier, nn.Linear)
        assert {k for k, _ in model.named_parameters() if k.startswith(HEAD_PREFIX)} == {
            "classifier.weight", "classifier.bias"}


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``datasets.load_dataset`` by one returning distinct tiny splits; records its calls."""
    calls: list[dict[str, Any]] = []

    def load_dataset(name: str, split: str, **kwargs: Any) -> FewShotDataset:
        calls.append({"name": name, "split": split, **kwargs})
        classes = {"train": 12, "validation": 6, "test": 7}[split]
        # Pixel value = 10 * class + sample, so every image says where it came from.
        values = torch.arange(classes)[:, None] * 10 + torch.arange(8)[None, :]  # (classes, 8)
        images = values[:, :, None, None, None].expand(classes, 8, 1, 4, 4).to(torch.uint8).contiguous()
        return FewShotDataset(name, split, images, [f"c{i}" for i in range(classes)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset, raising=False)
    return calls


def _origins(data: torch.Tensor) -> torch.Tensor:
    """(B,) pixel values 10 * class + sample of data (B, 1, 4, 4) in [0, 1]."""
    return (data[:, 0, 0, 0] * 255).round().long()


def test_get_tasksets_samples_like_learn2learn(fake_load: list[dict[str, Any]]) -> None:
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot", train_ways=5, train_samples=4, test_ways=3, test_samples=2, root="~/data", rotations=True,
    )
    assert [c["split"] for c in fake_load] == ["train", "validation", "test"]
    assert all(c["data_dir"] == str(Path("~/data").expanduser()) and c["rotations"] for c in fake_load)
    assert isinstance(tasksets.train, l2l.data.Taskset) and tasksets.train._fast is not None

    for _ in range(10):
        data, labels = tasksets.train.sample()
        assert data.shape == (20, 1, 4, 4) and data.dtype == torch.float32
        assert 0 <= data.min() <= data.max() <= 1
        assert labels.dtype == torch.int64
        origin = _origins(data).view(5, 4)  # (ways, samples): a class's samples are consecutive
        classes = origin // 10
        assert torch.all(classes == classes[:, :1]) and len(set(classes[:, 0].tolist())) == 5
        assert classes[:, 0].tolist() == sorted(classes[:, 0].tolist())  # ConsecutiveLabels
        assert all(len(set(row.tolist())) == 4 for row in origin % 10)  # distinct samples of each class
        groups = labels.view(5, 4)
        assert torch.all(groups == groups[:, :1]) and sorted(groups[:, 0].tolist()) == list(range(5))

        # learn2learn's examples split support and query by even and odd positions: each class is in both.
        assert sorted(labels[0::2].tolist()) == sorted(labels[1::2].tolist()) == sorted([*range(5)] * 2)

    data, labels = tasksets.validation.sample()
    assert data.shape == (6, 1, 4, 4) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert tasksets.test.sample()[0].shape == (6, 1, 4, 4)


def test_fixed_task_pool_and_seeding(fake_load: list[dict[str, Any]]) -> None:
    pool = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_samples=2, test_samples=2, num_tasks=4)
    assert len(pool.train) == 4
    tasks = {tuple(_origins(pool.train[i][0]).tolist()) for i in range(4)}
    assert torch.equal(pool.train[2][0], pool.train[2][0])
    for _ in range(10):
        assert tuple(_origins(pool.train.sample()[0]).tolist()) in tasks
    with pytest.raises(IndexError):
        pool.train[4]

    runs = []
    for _ in range(2):  # learn2learn's task sets draw from Python's random: random.seed reproduces them
        random.seed(3)
        fresh = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_samples=2, test_samples=2)
        runs.append([fresh.train.sample()[0] for _ in range(2)])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])
    assert len(fresh.train) == 1  # learn2learn's length of an unlimited task set


def test_get_tasksets_errors(fake_load: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="omniglot, mini-imagenet, tiered-imagenet, fc100, cifarfs, cub"):
        l2l.vision.benchmarks.get_tasksets("cifar-fs")
    with pytest.raises(ConfigError, match="ways=8 but split 'validation' has only 6 classes"):
        l2l.vision.benchmarks.get_tasksets("omniglot", train_samples=2, test_ways=8, test_samples=2)
    with pytest.raises(ConfigError, match="samples=10 but split 'train' has only 8"):
        l2l.vision.benchmarks.get_tasksets("omniglot")
    with pytest.raises(ConfigError, match="num_tasks"):
        l2l.vision.benchmarks.get_tasksets("omniglot", train_samples=2, test_samples=2, num_tasks=0)
    assert l2l.vision.benchmarks.list_tasksets() == ("omniglot", "mini-imagenet", "tiered-imagenet", "fc100",
                                                     "cifarfs", "cub")


@pytest.fixture
def builders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tests/data/data_builders.py, with its small data sets counting as complete."""
    module = load_script("tests/data/data_builders.py")
    monkeypatch.setattr(omniglot, "OFFICIAL_COUNTS", module.SMALL_COUNTS)
    monkeypatch.setattr(miniimagenet, "OFFICIAL_COUNTS", module.SMALL_MINI_COUNTS)
    monkeypatch.setattr(cifarfs, "OFFICIAL_COUNTS", module.SMALL_CIFARFS_COUNTS)
    monkeypatch.setattr(fc100, "OFFICIAL_COUNTS", module.SMALL_FC100_COUNTS)
    monkeypatch.setattr(tieredimagenet, "OFFICIAL_COUNTS", module.SMALL_TIERED_COUNTS)
    monkeypatch.setattr(cub, "OFFICIAL_COUNTS", module.SMALL_CUB_COUNTS)
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    return module


def test_full_omniglot_in_a_learn2learn_pipeline(tmp_path: Path, builders: ModuleType) -> None:
    builders.write_omniglot_zips(tmp_path / "data" / "omniglot")
    omniglot_ds = l2l.vision.datasets.FullOmniglot(root=tmp_path / "data")
    assert len(omniglot_ds) == 10 * 20 and omniglot_ds.class_names[0] == "Braille/character01"
    image, label = omniglot_ds[21]
    assert image.shape == (1, 28, 28) and label == 1 and 0 <= image.min() < image.max() <= 1
    dataset = l2l.data.MetaDataset(omniglot_ds)
    assert len(dataset.labels) == 10
    transforms = [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=3, k=2, filter_labels=list(range(6))),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
    ]
    tasks = l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=20)
    assert tasks._fast is not None
    data, labels = tasks.sample()
    assert data.shape == (6, 1, 28, 28) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_mini_imagenet_dataset_reads_learn2learns_pickle(tmp_path: Path, builders: ModuleType) -> None:
    builders.write_mini_pickle(tmp_path / "data" / "mini-imagenet", "validation")
    mini = l2l.vision.datasets.MiniImagenet(root=tmp_path / "data", mode="validation")
    assert len(mini) == 2 * 6
    image, label = mini[7]
    assert image.shape == (3, 84, 84) and image.max() > 1  # unscaled floats in [0, 255], as learn2learn's
    assert image.dtype == torch.float32 and float(image.max()) <= 255 and label == 1
    dataset = l2l.data.MetaDataset(mini)
    transforms = [l2l.data.transforms.NWays(dataset, 2), l2l.data.transforms.KShots(dataset, 3),
                  l2l.data.transforms.LoadData(dataset)]
    tasks = l2l.data.Taskset(dataset, transforms)
    data, _ = tasks.sample()
    assert tasks._fast is not None and data.shape == (6, 3, 84, 84) and data.max() > 1
    with pytest.raises(ConfigError, match="mode must be one of"):
        l2l.vision.datasets.MiniImagenet(root=tmp_path / "data", mode="val")
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        l2l.vision.datasets.MiniImagenet(root=tmp_path / "data", mode="validation", download=True)


def test_learn2learn_layouts_through_get_tasksets(tmp_path: Path, builders: ModuleType) -> None:
    """learn2learn's benchmark names over the files where learn2learn keeps them, in learn2learn's layout:
    (data, labels) with each class's samples consecutive, pixels in [0, 1] as its ToTensor gives them."""
    data = tmp_path / "data"
    builders.write_cifarfs(data / "cifarfs", as_zip=False)
    builders.write_fc100(data)  # learn2learn keeps FC100's pickles in the root itself
    builders.write_tiered(data / "tiered-imagenet")
    builders.write_cub(data / "cubirds200", as_tgz=True)
    random.seed(0)
    for name, shape in (("cifarfs", (3, 32, 32)), ("fc100", (3, 32, 32)), ("tiered-imagenet", (3, 84, 84)),
                        ("cub", (3, 84, 84))):
        tasksets = l2l.vision.benchmarks.get_tasksets(name, train_ways=2, train_samples=4, test_ways=2,
                                                      test_samples=4, root=data)
        for taskset in tasksets:
            x, y = taskset.sample()
            assert x.shape == (8, *shape) and 0 <= float(x.min()) and float(x.max()) <= 1
            assert sorted(y.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1] and torch.equal(y[::4], y[1::4])
    train = l2l.vision.benchmarks.get_tasksets("tiered-imagenet", train_samples=4, test_samples=4,
                                               train_ways=3, test_ways=2, root=data).train
    classes = {round(float(x[0, 0, 0]) * 255) for _ in range(30) for x in train.sample()[0]}
    assert classes == {0, 1, 2}  # every class of the ragged split, through the tensor fast path


def test_vision_datasets_with_learn2learns_signatures(tmp_path: Path, builders: ModuleType,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    builders.write_cifarfs(data / "cifarfs", as_zip=True)
    builders.write_fc100(data / "fc100", as_zip=True)
    builders.write_tiered(data / "tiered-imagenet")
    builders.write_cub(data / "cub", as_tgz=False)
    cifar = l2l.vision.datasets.CIFARFS(root=data, mode="validation")
    image, label = cifar[7]
    assert len(cifar) == 2 * 5 and image.shape == (3, 32, 32) and label == 1 and float(image.max()) <= 1
    fc = l2l.vision.datasets.FC100(data, mode="test", transform=lambda x: x * 2, target_transform=str)
    image, label = fc[6]
    assert len(fc) == 12 and label == "1" and float(image.max()) > 1 and fc.class_names == ["9", "72"]
    tiered = l2l.vision.datasets.TieredImagenet(root=data, mode="train")
    assert len(tiered) == 21 and tiered[5][1] == 1 and tiered[4][1] == 0  # classes of 5, 9, 7 images
    dataset = l2l.data.MetaDataset(tiered)
    assert [len(dataset.labels_to_indices[c]) for c in dataset.labels] == [5, 9, 7]
    transforms = l2l.data.transforms
    tasks = l2l.data.Taskset(dataset, [transforms.NWays(dataset, 2), transforms.KShots(dataset, 5),
                                       transforms.LoadData(dataset), transforms.RemapLabels(dataset)])
    assert tasks._fast is not None and tasks.sample()[0].shape == (10, 3, 84, 84)
    birds = l2l.vision.datasets.CUBirds200(root=data)  # mode="all", ImageNet duplicates left out
    assert len(birds) == 34 - 1 and birds.class_names[0].startswith("001.")
    with_duplicates = l2l.vision.datasets.CUBirds200(root=data, include_imagenet_duplicates=True)
    assert len(with_duplicates) == 34
    monkeypatch.setattr(cub, "TRIANTAFILLOU_SPLITS", {"validation": (2, 7), "test": (4,)})
    assert len(l2l.vision.datasets.CUBirds200(root=data, mode="test")) == 4
    for make, message in (
        (lambda: l2l.vision.datasets.CIFARFS(root=data, download=True), "cannot be downloaded.*cifar100.zip"),
        (lambda: l2l.vision.datasets.TieredImagenet(root=data, mode="val"), "mode must be one of"),
        (lambda: l2l.vision.datasets.CUBirds200(root=data, bounding_box_crop=True), "bounding_box_crop"),
        (lambda: l2l.vision.datasets.CUBirds200(root=data, mode="novel"), "mode must be one of all"),
    ):
        with pytest.raises(ConfigError, match=message):
            make()
