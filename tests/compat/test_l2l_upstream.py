"""learn2learn 0.2.0's own unit tests, run against metagrad's compat layer with only the import line changed.

The sdist is fetched from PyPI once (see ``l2l_upstream.py``); the test skips with the reason when it
cannot be. Each upstream file runs in its own pytest process (learn2learn's tests are unittest classes
that share nothing with ours). ``UPSTREAM`` lists the files for the parts metagrad provides;
``EXCLUDED`` says why each other test file of the sdist is not run (docs/MIGRATION.md repeats it).

``metadataset_test.py``'s fixtures (``util_datasets.py``) download MNIST with torchvision and Omniglot
from the internet; ``FIXTURE_EDITS`` replaces MNIST by a tensor stand-in of its shapes and labels and
points ``FullOmniglot`` at the real Omniglot (``$METAGRAD_DATA`` or ../shared/data; skipped when absent).
Nothing else of that file or of the test changes.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest
from l2l_upstream import FetchError, extract, fetch_sdist
from test_l2l_omniglot import _real_data_dir

UPSTREAM = [
    "tests/unit/algorithms/maml_test.py",
    "tests/unit/algorithms/metasgd_test.py",
    "tests/unit/utils_test.py",
    "tests/unit/data/task_dataset_test.py",
    "tests/unit/data/transforms_test.py",
    "tests/unit/data/utils_test.py",
    "tests/unit/data/metadataset_test.py",
]
"""learn2learn test files that must pass, whole, against the compat layer."""

EXCLUDED = {
    "tests/unit/algorithms/gbml_test.py": "GBML and learn2learn.optim (learnable update rules) not provided",
    "tests/unit/algorithms/lightning_*_test_notravis.py": "PyTorch Lightning wrappers not provided "
    "(lightning stays out of the library)",
    "tests/unit/nn/*": "learn2learn.nn (Kronecker layers, MetaOptNet, prototypical heads) not provided",
    "tests/unit/data/util_datasets.py": "the fixtures of metadataset_test.py, not tests",
    "tests/unit/vision/benchmarks_test_notravis.py": "downloads every learn2learn benchmark into ~/data; "
    "metagrad's two are covered by test_l2l_vision.py and the examples",
    "tests/unit/vision/transform_test_notravis.py": "tests torchvision's RandomRotation only (torchvision is "
    "not a dependency)",
    "tests/unit/vision/pretrained_backbones_notravis.py": "pretrained ResNet12/WRN28 weights not provided",
    "tests/unit/vision/*_test_no*.py": "CIFAR-FS, FC100, CUB, DTD, FGVC, VGG Flowers, tiered-ImageNet, "
    "Quickdraw readers not provided; they also download from the internet",
    "tests/integration/*": "use torchvision transforms and download Omniglot / Mini-ImageNet; the vision "
    "examples run instead (test_l2l_examples.py)",
}
"""Patterns of the other files under the sdist's tests/ -> why they are not run (docs/MIGRATION.md too)."""


FIXTURES = "tests/unit/data/util_datasets.py"
FIXTURE_EDITS = [  # (learn2learn's text, its replacement); each must occur exactly once
    ("from torchvision.datasets import MNIST\n", ""),
    ("        return MNIST(self.download_location, train=True, download=True)\n",
     ("        # MNIST's training set in shape and labels: 6,000 uint8 28x28 images, 600 of each digit\n"
      "        images = torch.randint(0, 256, (6000, 28, 28), dtype=torch.uint8)\n"
      "        return TensorDataset(images, torch.arange(10).repeat(600))\n")),
    ("        return FullOmniglot(root=self.download_location, download=True)\n",
     "        return FullOmniglot(root={data_dir!r}, download=False)\n"),
]


def edit_fixtures(upstream: Path, data_dir: Path) -> None:
    """``util_datasets.py`` without downloads: MNIST a tensor stand-in, Omniglot from ``data_dir``."""
    path = upstream / FIXTURES
    text = path.read_text()
    for old, new in FIXTURE_EDITS:
        assert text.count(old) == 1, f"{FIXTURES} no longer contains {old!r} once"
        text = text.replace(old, new.format(data_dir=str(data_dir)))
    path.write_text(text)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        sdist = fetch_sdist()
    except FetchError as err:
        pytest.skip(f"learn2learn's tests need its sdist from PyPI: {err}")
    return extract(sdist, tmp_path_factory.mktemp("learn2learn"), ("tests/",))


@pytest.mark.slow
@pytest.mark.parametrize("test_file", UPSTREAM)
def test_learn2learn_unit_tests_pass(upstream: Path, test_file: str) -> None:
    if test_file.endswith("metadataset_test.py"):
        data_dir = _real_data_dir()
        if data_dir is None:
            pytest.skip("metadataset_test.py needs the real Omniglot in $METAGRAD_DATA or ../shared/data")
        edit_fixtures(upstream, data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rA", test_file],
        cwd=upstream, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # the summary line ("8 passed, 6 warnings in 10.5s"): warnings' texts may contain any word
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|skipped|error", summary), summary


@pytest.mark.slow
def test_every_learn2learn_test_file_is_run_or_excluded_with_a_reason(upstream: Path) -> None:
    files = sorted(str(p.relative_to(upstream)) for p in (upstream / "tests").rglob("*.py")
                   if p.name != "__init__.py")
    assert set(UPSTREAM) <= set(files)
    assert not [f for f in UPSTREAM if any(fnmatch.fnmatch(f, pattern) for pattern in EXCLUDED)]
    unaccounted = [f for f in files if f not in UPSTREAM and not any(fnmatch.fnmatch(f, p) for p in EXCLUDED)]
    assert not unaccounted, f"learn2learn test files neither run nor excluded: {unaccounted}"
