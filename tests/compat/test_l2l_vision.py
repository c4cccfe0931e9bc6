"""``l2l.vision``: learn2learn's model constructors and ``get_tasksets`` over metagrad's datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import metagrad.compat.learn2learn as l2l
from metagrad.data import datasets
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

    mini = l2l.vision.models.MiniImagenetCNN(5)
    assert mini.features(torch.rand(2, 3, 84, 84)).shape == (2, 800)
    wide = l2l.vision.models.MiniImagenetCNN(output_size=5, hidden_size=16, layers=4)
    assert wide.classifier.in_features == 400
    for model in (cnn, fc, mini):
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

    data, labels = tasksets.train.sample()
    assert data.shape == (20, 1, 4, 4) and data.dtype == torch.float32 and 0 <= data.min() <= data.max() <= 1
    assert labels.dtype == torch.int64 and labels.tolist() == [c for c in range(5) for _ in range(4)]
    origin = _origins(data).view(5, 4)  # (ways, samples): a class's samples are consecutive
    classes = origin // 10
    assert torch.all(classes == classes[:, :1]) and len(set(classes[:, 0].tolist())) == 5
    assert all(len(set(row.tolist())) == 4 for row in origin % 10)  # distinct samples of each class

    # learn2learn's examples split support and query by even and odd positions: each class is in both.
    support, query = labels[0::2], labels[1::2]
    assert sorted(support.tolist()) == sorted(query.tolist()) == [c for c in range(5) for _ in range(2)]

    data, labels = tasksets.validation.sample()
    assert data.shape == (6, 1, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert tasksets.test.sample()[0].shape == (6, 1, 4, 4)


def test_fixed_task_pool_and_seeding(fake_load: list[dict[str, Any]]) -> None:
    torch.manual_seed(3)
    pool = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_samples=2, test_samples=2, num_tasks=4)
    assert len(pool.train) == 4
    tasks = {tuple(_origins(pool.train[i][0]).tolist()) for i in range(4)}
    assert torch.equal(pool.train[2][0], pool.train[2][0])
    for _ in range(10):
        assert tuple(_origins(pool.train.sample()[0]).tolist()) in tasks
    with pytest.raises(IndexError):
        pool.train[4]

    torch.manual_seed(3)
    again = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_samples=2, test_samples=2)
    torch.manual_seed(3)
    same = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_samples=2, test_samples=2)
    assert torch.equal(again.train.sample()[0], same.train.sample()[0])
    assert not torch.equal(again.train.sample()[0], again.train.sample()[0])
    with pytest.raises(TypeError, match="unlimited"):
        len(again.train)


def test_get_tasksets_errors(fake_load: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="omniglot, mini-imagenet"):
        l2l.vision.benchmarks.get_tasksets("cifarfs")
    with pytest.raises(ConfigError, match="ways=8 but split 'validation' has only 6 classes"):
        l2l.vision.benchmarks.get_tasksets("omniglot", train_samples=2, test_ways=8, test_samples=2)
    with pytest.raises(ConfigError, match="samples=10 but split 'train' has only 8"):
        l2l.vision.benchmarks.get_tasksets("omniglot")
    with pytest.raises(ConfigError, match="num_tasks"):
        l2l.vision.benchmarks.get_tasksets("omniglot", train_samples=2, test_samples=2, num_tasks=0)
    assert l2l.vision.benchmarks.list_tasksets() == ("omniglot", "mini-imagenet")
