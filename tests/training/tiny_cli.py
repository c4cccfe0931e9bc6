"""The ``metagrad`` command on the tiny dataset, for tests that run it as a subprocess (under torchrun too).

    torchrun --standalone --nproc-per-node 2 tests/training/tiny_cli.py train --run-dir DIR ...

Test switches, read from the environment:

- ``METAGRAD_TEST_KILL=RANK:ITERATION``: the process of that rank kills itself (SIGKILL, as the OOM
  killer would) when it starts that iteration's meta-gradient.
- ``METAGRAD_TEST_READ_ONLY=DIR``: every process but rank 0 fails as soon as it writes under DIR.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from tiny_run import fake_load_dataset

from metagrad.cli import main
from metagrad.training import loop, setup

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod"}


def kill_at(rank: int, iteration: int) -> None:
    real = loop.compute_meta_gradients
    calls = {"n": 0}

    def compute(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == iteration and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    loop.compute_meta_gradients = compute


def forbid_writes_under(folder: str) -> None:
    root = os.path.realpath(folder)

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        elif event in WRITE_EVENTS:
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, bytes, Path)):
            real = os.path.realpath(os.fsdecode(path))
            if real == root or real.startswith(root + os.sep):
                raise RuntimeError(f"rank {os.environ.get('RANK')} wrote {real} ({event})")

    sys.addaudithook(audit)


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the in-process tests: bit-for-bit comparisons need the same count
    setup.load_dataset = fake_load_dataset()
    if os.environ.get("METAGRAD_TEST_KILL"):
        kill_at(*map(int, os.environ["METAGRAD_TEST_KILL"].split(":")))
    if os.environ.get("METAGRAD_TEST_READ_ONLY") and os.environ.get("RANK", "0") != "0":
        forbid_writes_under(os.environ["METAGRAD_TEST_READ_ONLY"])
    raise SystemExit(main(sys.argv[1:]))
