"""FC100: MetaOptNet's pickles (Python 2 and 3), in fc100/, at the data folder's root, or in fc100.zip."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_builders import SMALL_FC100_COUNTS, fc100_payload, py2_pickle, tagged_image, write_fc100

from metagrad.data import dataset_info, fc100, load_dataset
from metagrad.errors import DataError

pytestmark = pytest.mark.usefixtures("small_benchmark_counts")


@pytest.mark.parametrize(("where", "as_zip", "protocol"),
                         [("fc100", False, 2), ("", False, 4), ("fc100", True, 2), ("", True, 5)])
def test_reads_pickles_folder_root_and_zip(tmp_path: Path, where: str, as_zip: bool, protocol: int) -> None:
    write_fc100(tmp_path / "data" / where if where else tmp_path / "data", as_zip=as_zip, protocol=protocol)
    train = load_dataset("fc100", "train", data_dir=tmp_path / "data")
    assert train.images.shape == (4, SMALL_FC100_COUNTS.images, 3, 32, 32) and train.class_sizes is None
    assert train.class_names == ["3", "17", "40", "88"]  # CIFAR-100 fine-label ids, ascending
    assert train.images[2, 5, :, 0, 0].tolist() == [40, 5, 7]  # (label, index) of the interleaved file
    info = dataset_info("fc100", data_dir=tmp_path / "data")
    assert info["splits"]["validation"] == {"classes": 2, "images_per_class": 6}


def test_python2_pickles(tmp_path: Path) -> None:
    """MetaOptNet wrote its pickles with Python 2: keys and numpy's bytes are byte strings."""
    root = write_fc100(tmp_path / "fc100")
    payload = fc100_payload("test")
    blob = py2_pickle(payload)
    data = payload["data"].tobytes()
    assert b"_codecs" not in blob and b"T" + len(data).to_bytes(4, "little") + data in blob  # a BINSTRING
    (root / "FC100_test.pickle").write_bytes(blob)
    test = load_dataset("fc100", "test", data_dir=tmp_path)
    assert test.images[1, 0, :, 0, 0].tolist() == [72, 0, 7]


def test_missing_files_say_where_they_come_from(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no FC100_val.pickle or fc100.zip in .*fc100 \(the folder does not "
                                        r"exist\).*MetaOptNet"):
        load_dataset("fc100", "validation", data_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_a_pickle_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "fc100"
    write_fc100(root)
    (root / "FC100_train.pickle").write_bytes(pickle.dumps({"data": _Evil(), "labels": []}))
    with pytest.raises(DataError, match=r"FC100_train.pickle contains a pickled '(posix|os).system'.*refus"):
        load_dataset("fc100", "train", data_dir=tmp_path)
    with zipfile.ZipFile(root / fc100.ARCHIVE, "w") as zf:
        zf.writestr("FC100_val.pickle", pickle.dumps([_Evil()]))
    (root / "FC100_val.pickle").unlink()
    with pytest.raises(DataError, match=r"fc100.zip: FC100_val.pickle contains a pickled"):
        load_dataset("fc100", "validation", data_dir=tmp_path)


@pytest.mark.parametrize(("payload", "message"), [
    ([1, 2], "not an FC100 pickle: expected a dict with 'data'"),
    ({"data": np.zeros((2, 32, 32), np.uint8), "labels": [0, 1]}, r"expected uint8 \(N, 32, 32, 3\)"),
    ({"data": np.zeros((3, 32, 32, 3), np.uint8), "labels": [0, 1]}, "2 labels for 3 images"),
    ({"data": np.stack([tagged_image(0, i, 32) for i in range(12)]), "labels": [0] * 6 + [1] * 6},
     "holds 2 classes of 6 to 6 images; FC100's 'train' split has 4 of 6"),
    ({"data": np.zeros((1, 32, 32, 3), np.uint8), "labels": ["a"]}, "'labels' must be integers"),
])
def test_malformed_pickles(tmp_path: Path, payload: object, message: str) -> None:
    root = write_fc100(tmp_path / "fc100")
    (root / "FC100_train.pickle").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=message):
        load_dataset("fc100", "train", data_dir=tmp_path)


def test_truncated_and_html_pickles(tmp_path: Path) -> None:
    root = write_fc100(tmp_path / "fc100")
    path = root / "FC100_test.pickle"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="FC100_test.pickle is not a readable pickle"):
        load_dataset("fc100", "test", data_dir=tmp_path)
    path.write_bytes(b"<!DOCTYPE html><html>Google Drive</html>")
    with pytest.raises(DataError, match="is an HTML page"):
        load_dataset("fc100", "test", data_dir=tmp_path)
