"""The C allocator setting of the compute commands: freed blocks are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metagrad import cli
from metagrad.training import malloc

needs_glibc = pytest.mark.skipif(malloc.glibc() is None,
                                 reason="mallopt is glibc's; this platform has another C library")

# A "step" that allocates three 64 MB tensors and frees them, repeated; prints each step's page faults.
_PROBE = """
import json, resource, sys, torch
from metagrad.training.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    a = torch.empty(16 * 2**20)
    a.fill_(1.0)
    return float((torch.relu(a) * 2)[-1])
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_NUM_THREADS": "1"}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_memory_is_reused_without_page_faults() -> None:
    default, keep = _probe("default"), _probe("keep")
    assert not default["applied"] and keep["applied"]
    # 3 x 64 MB is 49,152 pages of 4 KB. By default each step maps its blocks afresh and faults them in
    # again; kept, the heap grows over the first steps (glibc 2.36: about six) and later steps reuse it.
    assert min(default["faults"][-4:]) > 30_000, default
    assert sum(keep["faults"][-4:]) < 0.1 * sum(default["faults"][-4:]), keep


def test_env_var_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(malloc.ENV_VAR, "default")
    assert malloc.keep_freed_memory() is False


def test_only_compute_commands_tune_the_allocator(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    cli.main(["results", str(tmp_path)])  # an empty folder: an error, and no setting
    assert calls == []
    cli.main(["bench", "--preset", "no-such-preset"])  # fails on the preset, after the setting
    assert calls == [1]
