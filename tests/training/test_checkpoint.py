"""Checkpoints: atomic writes keep the previous copy; unreadable ones fall back; no code runs on load."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

from metagrad.errors import FileError, TrainingError
from metagrad.training.checkpoint import (
    FORMAT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(iteration: int) -> dict:
    params = {"w": torch.full((3,), float(iteration))}
    return {"format": FORMAT_VERSION, "iteration": iteration, "params": params}


def test_save_keeps_the_previous_copy_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)
    assert load_checkpoint(path)["iteration"] == 2
    assert torch.load(tmp_path / "latest.prev.pt", weights_only=True)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.prev.pt", "latest.pt"]


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "latest.pt") is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(500), "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(path)
    assert state["iteration"] == 1
    assert "latest.pt is unreadable" in caplog.text and "using the previous checkpoint" in caplog.text


def test_latest_missing_but_previous_present(tmp_path: Path) -> None:
    # kill -9 between the two renames of save_checkpoint leaves only the previous copy.
    save_checkpoint(_state(4), tmp_path / "latest.prev.pt")
    assert load_checkpoint(tmp_path / "latest.pt")["iteration"] == 4


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "latest.prev.pt").write_bytes(b"")
    with pytest.raises(TrainingError, match="no readable checkpoint: .*latest.pt .*latest.prev.pt"):
        load_checkpoint(tmp_path / "latest.pt")


def test_other_files_are_refused(tmp_path: Path) -> None:
    torch.save({"iteration": 3}, tmp_path / "latest.pt")  # no format marker
    with pytest.raises(TrainingError, match="not a metagrad checkpoint"):
        load_checkpoint(tmp_path / "latest.pt")


class _Payload:
    def __reduce__(self):  # unpickling would run os.system
        return (os.system, (f"touch {self.marker}",))


def test_loading_runs_no_code(tmp_path: Path) -> None:
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    torch.save({"format": FORMAT_VERSION, "evil": payload}, tmp_path / "latest.pt")
    with pytest.raises(TrainingError, match="no readable checkpoint"):
        load_checkpoint(tmp_path / "latest.pt")
    assert not (tmp_path / "pwned").exists()


def test_rng_states_round_trip() -> None:
    generators = {"train": torch.Generator().manual_seed(1)}
    state = capture_rng_state(generators, torch.device("cpu"))
    expected = (torch.rand(3), torch.rand(3, generator=generators["train"]))
    torch.manual_seed(99)
    generators["train"].manual_seed(99)
    restore_rng_state(state, generators, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, generator=generators["train"]), expected[1])


def _flip_bit_in_params(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes where the checkpoint file stores them."""
    data = bytearray(path.read_bytes())
    at = data.index(tensor.numpy().tobytes())
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_bit_falls_back_to_the_previous_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)
    _flip_bit_in_params(path, _state(2)["params"]["w"])
    assert torch.load(path, weights_only=True)["iteration"] == 2  # torch itself loads it without a word
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(path)
    assert state["iteration"] == 1 and "does not match its checksum" in caplog.text


def test_flipped_bit_without_a_previous_copy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(_state(3), path)
    _flip_bit_in_params(path, _state(3)["params"]["w"])
    with pytest.raises(TrainingError, match=r"no readable checkpoint: .*best\.pt .*does not match its"):
        load_checkpoint(path)


def test_a_checkpoint_without_checksum_loads_as_legacy(tmp_path: Path) -> None:
    torch.save(_state(5), tmp_path / "best.pt")  # as metagrad wrote them before checksums (results/*/best.pt)
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["iteration"] == 5 and torch.equal(state["params"]["w"], torch.full((3,), 5.0))


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(_state(1), path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(FileError, match=r"cannot write the checkpoint .*latest\.pt: No space left on device "
                                        r"\(the disk is full"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # no temporary file left


def test_a_checkpoint_that_is_no_regular_file_is_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "best.pt")  # torch.load would wait forever for a writer
    with pytest.raises(TrainingError, match=r"best\.pt \(ValueError: not a regular file\)"):
        load_checkpoint(tmp_path / "best.pt")
