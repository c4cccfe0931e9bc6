"""The C allocator settings of the compute commands: every freed block kept, or large ones on huge pages."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metagrad import _malloc, cli

needs_glibc = pytest.mark.skipif(_malloc.glibc() is None,
                                 reason="mallopt is glibc's; this platform has another C library")
needs_thp = pytest.mark.skipif(_malloc.kernel_thp_mode() not in ("always", "madvise"),
                               reason="the kernel offers no transparent huge pages here")

# A "step" that allocates blocks of `mb` MB, touches and frees them, repeated; prints each step's page
# faults and the resident memory once they are freed.
_PROBE = """
import json, resource, sys
from metagrad import _malloc
setting, mb = sys.argv[1], int(sys.argv[2])
import torch
applied = _malloc.tune(setting)
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
def step():
    blocks = [torch.empty(mb * 2**18) for _ in range(3)]
    for b in blocks:
        b.fill_(1.0)
    return float(sum(b[-1] for b in blocks))
faults, resident = [], []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident.append(resident_mb())
print(json.dumps({"applied": applied, "in_force": _malloc.applied(), "faults": faults, "resident": resident}))
"""


def _probe(setting: str, mb: int = 64, **env: str) -> dict:
    clean = {"PATH": "", "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", _PROBE, setting, str(mb)], capture_output=True, text=True,
                         check=True, env=clean, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_keep_reuses_freed_memory_without_page_faults() -> None:
    default, keep = _probe("default"), _probe("keep")
    assert default["applied"] is None and keep["applied"] == "keep"
    assert default["in_force"] is None and keep["in_force"] == "keep"  # what bench --json reports
    # 3 x 64 MB is 49,152 pages of 4 KB. By default each step maps its blocks afresh and faults them in
    # again; kept, the heap grows over the first steps (glibc 2.36: about six) and later steps reuse it.
    assert min(default["faults"][-4:]) > 30_000, default
    assert sum(keep["faults"][-4:]) < 0.1 * sum(default["faults"][-4:]), keep
    assert min(keep["resident"][-4:]) > min(default["resident"][-4:]) + 150  # kept: the heap holds them


@needs_glibc
@needs_thp
def test_huge_maps_large_blocks_on_huge_pages_and_returns_them() -> None:
    default = _probe("default")
    huge = _probe("huge", **{_malloc.THP_VARIABLE: "1"})
    assert huge["applied"] == "huge"
    # 2 MB pages: a 64 MB block is 32 faults (plus its unaligned ends) instead of 16,384; loose, since
    # a kernel short of free huge pages falls back to small ones for some
    assert sum(huge["faults"][-4:]) < 0.5 * sum(default["faults"][-4:]), huge
    assert max(huge["resident"][-4:]) < min(default["resident"][-4:]) + 50  # unmapped once freed


@needs_glibc
def test_huge_keeps_middle_sized_blocks_in_the_heap() -> None:
    # 12 MB, under LARGE_BLOCK: kept in the heap, which is never trimmed, so once it has grown most steps
    # fault nothing (mapped afresh, every step would fault 3 x 12 MB = 9,216 pages). The heap may still
    # grow by a block now and then where small allocations split its holes (seen: 3,072 faults in 1 or 2
    # of the last 8 steps), and glibc's default itself sometimes keeps them, so it is no baseline here.
    # Without torch's huge-page advice, with which the kernel may collapse heap pages now and then.
    huge = _probe("huge", mb=12)
    assert huge["applied"] == "huge"
    assert sum(huge["faults"][-8:]) < 2 * 9216, huge
    resident = huge["resident"][2:]
    assert all(later > earlier - 1 for earlier, later in itertools.pairwise(resident)), huge  # never trimmed


def _sysfs(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / "enabled"
    path.write_text({"always": "[always] madvise never\n", "madvise": "always [madvise] never\n",
                     "never": "always madvise [never]\n"}[mode])
    return path


HUGE = {_malloc.ENV_VAR: "huge"}


@pytest.mark.parametrize(("kernel", "env", "expected"), [
    ("always", {}, "keep"),  # the default
    ("always", {_malloc.ENV_VAR: " Keep"}, "keep"),
    ("always", {_malloc.ENV_VAR: "default"}, "default"),
    ("madvise", {**HUGE, _malloc.THP_VARIABLE: "1"}, "huge"),
    ("always", HUGE, "huge"),
    ("madvise", HUGE, "keep"),  # torch does not advise: mapped blocks would fault page by page
    ("madvise", {**HUGE, _malloc.THP_VARIABLE: "0"}, "keep"),
    ("never", {**HUGE, _malloc.THP_VARIABLE: "1"}, "keep"),
])
def test_mode_follows_the_switch_and_the_kernel(tmp_path: Path, kernel: str, env: dict[str, str],
                                                expected: str) -> None:
    assert _malloc.mode(env, _sysfs(tmp_path, kernel)) == expected


def test_unknown_or_unavailable_settings_warn_and_keep(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert _malloc.mode({_malloc.ENV_VAR: "kep"}, _sysfs(tmp_path, "always")) == "keep"
    assert "METAGRAD_MALLOC='kep' is not a setting (keep, huge or default)" in caplog.text
    assert _malloc.mode(HUGE, _sysfs(tmp_path, "never")) == "keep"
    assert "METAGRAD_MALLOC=huge: torch's blocks get no huge pages here (kernel mode never" in caplog.text
    assert _malloc.kernel_thp_mode(tmp_path / "missing") is None


@pytest.mark.parametrize(("kernel", "env", "modules", "sets"), [
    ("madvise", HUGE, set(), True),
    ("madvise", {}, set(), False),  # the default keeps freed memory and needs no advice
    ("madvise", {_malloc.ENV_VAR: "keep"}, set(), False),
    ("always", HUGE, set(), False),  # the kernel backs everything already
    ("never", HUGE, set(), False),
    ("madvise", {**HUGE, _malloc.THP_VARIABLE: "0"}, set(), False),  # the user's choice wins
    ("madvise", HUGE, {"torch"}, False),  # torch read the variable at its first allocation
])
def test_request_huge_pages(tmp_path: Path, kernel: str, env: dict[str, str], modules: set[str],
                            sets: bool) -> None:
    environ = dict(env)
    done = _malloc.request_huge_pages(environ, modules, _sysfs(tmp_path, kernel))
    assert (done == {_malloc.THP_VARIABLE: "1"}) is sets
    assert environ == ({**env, **done})
    if not modules:  # a fresh command: huge where asked and the kernel can (and the user did not say 0)
        possible = kernel != "never" and env.get(_malloc.THP_VARIABLE) != "0"
        expected = "huge" if env.get(_malloc.ENV_VAR) == "huge" and possible else "keep"
        assert _malloc.command_mode(env, _sysfs(tmp_path, kernel)) == expected


def test_bad_setting_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of keep, huge, default"):
        _malloc.tune("fast")


def test_only_compute_commands_tune_the_allocator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(_malloc, "tune", lambda: calls.append(1) or "keep")
    cli.main(["results", str(tmp_path)])  # an empty folder: an error, and no setting
    assert calls == []
    cli.main(["bench", "--preset", "no-such-preset"])  # fails on the preset, after the setting
    assert calls == [1]


@needs_thp
@pytest.mark.parametrize("setting", ["huge", "keep", None])
def test_the_command_requests_huge_pages_before_torch_loads(setting: str | None) -> None:
    code = ("import os, sys; sys.argv = ['metagrad', '--version']\n"
            "from metagrad.__main__ import main\n"
            "main(); import torch; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in os.environ.items() if k not in (_malloc.THP_VARIABLE, _malloc.ENV_VAR)}
    if setting:
        env[_malloc.ENV_VAR] = setting
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120)
    expected = "1" if setting == "huge" and _malloc.kernel_thp_mode() == "madvise" else "None"
    assert done.stdout.strip().splitlines()[-1] == expected
