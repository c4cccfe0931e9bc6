"""learn2learn 0.2.0's vision examples, run against the compat layer with only the import line changed,
and anil_fc100.py's ANIL pattern written the same way on Omniglot.

The examples come from learn2learn's sdist on PyPI (``l2l_upstream.py``) and run in this process:
their ``main()`` is called with smaller iteration counts and ``cuda=False`` (its own parameters), with
``$HOME`` pointing at a folder whose ``data/`` is the data folder, because the examples read ``~/data``.
Mini-ImageNet is a generated fixture in learn2learn's pickle format (the real one is not here).
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from l2l_upstream import FetchError, extract, fetch_sdist
from repo_scripts import load_script
from test_l2l_omniglot import _real_data_dir, fast_adapt
from torch import nn

import metagrad.compat.learn2learn as l2l
from metagrad.data import miniimagenet
from metagrad.data.datasets import resolve_cache_dir


def _example(tmp_path: Path, name: str) -> ModuleType:
    """learn2learn's ``examples/vision/<name>`` with its imports rewritten, loaded as a module."""
    try:
        sdist = fetch_sdist()
    except FetchError as err:
        pytest.skip(f"learn2learn's examples need its sdist from PyPI: {err}")
    path = extract(sdist, tmp_path / "l2l", (f"examples/vision/{name}",)) / "examples" / "vision" / name
    spec = importlib.util.spec_from_file_location(f"l2l_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _home_with_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """Make ``~/data`` (where the examples look) ``data_dir``, keeping metagrad's cache where it was."""
    monkeypatch.setenv("METAGRAD_CACHE", str(resolve_cache_dir()))
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(data_dir, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))


def _printed(out: str, what: str) -> list[float]:
    return [float(v) for v in re.findall(rf"^{what} ([-\d.e]+)$", out, re.MULTILINE)]


@pytest.mark.slow
@pytest.mark.skipif(_real_data_dir() is None, reason="real Omniglot not in $METAGRAD_DATA or ../shared/data")
def test_maml_omniglot_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    example = _example(tmp_path, "maml_omniglot.py")
    _home_with_data(tmp_path, monkeypatch, _real_data_dir())
    example.main(num_iterations=60, cuda=False)
    out = capsys.readouterr().out
    train = _printed(out, "Meta Train Accuracy")
    assert len(train) == 60 and len(_printed(out, "Meta Test Accuracy")) == 1
    # 5-way: chance is 0.2; learning shows within 60 iterations of 32 tasks
    assert np.mean(train[-10:]) > np.mean(train[:10]) + 0.1, train


@pytest.mark.slow
def test_maml_miniimagenet_example_on_a_pickle_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    builders = load_script("tests/data/data_builders.py")
    counts = miniimagenet.Counts(classes=(("train", 6), ("validation", 5), ("test", 5)), images=10)
    monkeypatch.setattr(miniimagenet, "OFFICIAL_COUNTS", counts)
    for split in ("train", "validation", "test"):
        builders.write_mini_pickle(tmp_path / "data" / "mini-imagenet", split,
                                   builders.mini_pickle_payload(split, counts))
    example = _example(tmp_path, "maml_miniimagenet.py")
    _home_with_data(tmp_path, monkeypatch, tmp_path / "data")
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    example.main(meta_batch_size=2, num_iterations=2, cuda=False)  # 5-way 5-shot, as the example
    out = capsys.readouterr().out
    assert len(_printed(out, "Meta Train Accuracy")) == 2
    assert all(0 <= a <= 1 for a in _printed(out, "Meta Test Accuracy"))


def _anil_fast_adapt(batch, learner, features, loss, adaptation_steps, shots, ways):  # as anil_fc100.py
    data, labels = batch
    return fast_adapt((features(data), labels), learner, loss, adaptation_steps, shots, ways)


@pytest.mark.slow
@pytest.mark.skipif(_real_data_dir() is None, reason="real Omniglot not in $METAGRAD_DATA or ../shared/data")
def test_anil_fc100_pattern_on_omniglot() -> None:
    """anil_fc100.py's structure (features outside MAML, the head wrapped, its own dataset through
    MetaDataset / Taskset / transforms), on Omniglot with a 1-channel CNN4."""
    ways, shots, meta_lr, fast_lr, adapt_steps, meta_bsz, iters = 5, 1, 0.003, 0.5, 3, 16, 80
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    dataset = l2l.data.MetaDataset(l2l.vision.datasets.FullOmniglot(root=_real_data_dir()))
    classes = list(range(1623))
    random.shuffle(classes)

    def tasks(labels: list[int], num_tasks: int) -> l2l.data.Taskset:
        return l2l.data.Taskset(dataset, task_transforms=[
            l2l.data.transforms.FusedNWaysKShots(dataset, n=ways, k=2 * shots, filter_labels=labels),
            l2l.data.transforms.LoadData(dataset),
            l2l.data.transforms.RemapLabels(dataset),
            l2l.data.transforms.ConsecutiveLabels(dataset),
            l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
        ], num_tasks=num_tasks)

    train_tasks, test_tasks = tasks(classes[:1100], 20000), tasks(classes[1200:], 600)
    model = l2l.vision.models.CNN4(output_size=ways, hidden_size=32, channels=1, embedding_size=32)
    features = model.features
    head = l2l.algorithms.MAML(model.classifier, lr=fast_lr)
    optimizer = torch.optim.Adam(list(features.parameters()) + list(head.parameters()), lr=meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")

    def test_accuracy() -> float:
        return float(np.mean([_anil_fast_adapt(test_tasks.sample(), head.clone(), features, loss, adapt_steps,
                                               shots, ways)[1].item() for _ in range(100)]))

    before = test_accuracy()
    for _ in range(iters):
        optimizer.zero_grad()
        for _ in range(meta_bsz):
            error, _ = _anil_fast_adapt(train_tasks.sample(), head.clone(), features, loss, adapt_steps,
                                        shots, ways)
            error.backward()
        for p in list(features.parameters()) + list(head.parameters()):
            p.grad.data.mul_(1.0 / meta_bsz)
        optimizer.step()
    after = test_accuracy()
    assert after > max(0.4, before + 0.1), (before, after)  # chance is 0.2
