"""Importing metagrad changes nothing; the ``metagrad`` command sets OpenMP's waiting before torch loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metagrad._openmp import ENV_VAR, SETTING, USER_VARIABLES, spinning_warning, tune_wait

OPENMP_VARIABLES = (*USER_VARIABLES, ENV_VAR, "OMP_NUM_THREADS", "OMP_DISPLAY_ENV")
needs_libgomp = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                   reason="torch's Linux wheels use libgomp; elsewhere another OpenMP")


def _clean_environment(**env: str) -> dict[str, str]:
    """This process's environment without OpenMP settings (conftest set some), plus ``env``."""
    return {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES} | env


def _python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=_clean_environment(**env), capture_output=True,
                          text=True, check=True, timeout=120)
    return done.stdout.strip().splitlines()[-1]


def test_tune_wait_sets_the_setting_when_the_user_chose_nothing() -> None:
    environ: dict[str, str] = {}
    assert tune_wait(environ, modules=set()) == SETTING
    assert environ == SETTING


@pytest.mark.parametrize("chosen", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": ""},
                                    {"GOMP_SPINCOUNT": "300000"}, {ENV_VAR: "default"},
                                    {ENV_VAR: " Default"}])
def test_tune_wait_keeps_the_users_choice(chosen: dict[str, str]) -> None:
    environ = dict(chosen)
    assert tune_wait(environ, modules=set()) == {}
    assert environ == chosen


def test_tune_wait_does_nothing_once_torch_is_loaded() -> None:
    # libgomp read its variables when torch loaded it: setting them now would claim an effect they lack
    environ: dict[str, str] = {}
    assert tune_wait(environ, modules={"torch"}) == {}
    assert environ == {}


def test_warns_only_for_several_cpu_threads_under_libgomps_default() -> None:
    warning = spinning_warning("cpu", 2, environ={})
    assert warning is not None and "OMP_NUM_THREADS=1" in warning
    assert "metagrad.tune_process()" in warning and "GOMP_SPINCOUNT=1000" in warning
    assert "import metagrad" not in warning  # the import order no longer matters
    assert spinning_warning("cpu", 1, environ={}) is None  # one thread: nothing waits
    assert spinning_warning("cuda", 2, environ={}) is None
    assert spinning_warning("cpu", 2, environ=dict(SETTING)) is None
    assert spinning_warning("cpu", 2, environ={"GOMP_SPINCOUNT": "1000"}) is None
    assert spinning_warning("cpu", 2, environ={ENV_VAR: "default"}) is None
    assert spinning_warning("cpu", 2, environ={"OMP_WAIT_POLICY": "PASSIVE"}) is None


def test_importing_metagrad_changes_neither_the_environment_nor_the_threads() -> None:
    # A fresh process, so that torch loads here; the public API and the command's modules are used too.
    code = ("import os, json; before = dict(os.environ)\n"
            "import metagrad, metagrad.__main__, metagrad.cli\n"
            "model = metagrad.build_model('omniglot-cnn', ways=5)\n"
            "import torch\n"
            "print(json.dumps({'same': dict(os.environ) == before, 'threads': torch.get_num_threads()}))")
    plain_threads = int(_python("import torch; print(torch.get_num_threads())"))
    assert json.loads(_python(code)) == {"same": True, "threads": plain_threads}


def test_the_package_and_the_entry_point_import_no_torch() -> None:
    assert _python("import sys, metagrad, metagrad.__main__, metagrad._openmp; "
                   "print('torch' in sys.modules)") == "False"


def _libgomp_report(command: list[str], **env: str) -> dict[str, str]:
    """libgomp's own report of the variables it read when torch loaded it (OMP_DISPLAY_ENV)."""
    done = subprocess.run(command, env=_clean_environment(OMP_DISPLAY_ENV="VERBOSE", **env),
                          capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.startswith("metagrad "), done.stdout
    return dict(re.findall(r"^\s*(OMP_WAIT_POLICY|GOMP_SPINCOUNT) = '([^']*)'", done.stderr, re.MULTILINE))


def _console_script() -> str:
    script = Path(sys.executable).with_name("metagrad")
    found = str(script) if script.is_file() else shutil.which("metagrad")
    assert found, "the metagrad console script is not installed (pip install -e .)"
    return found


@needs_libgomp
@pytest.mark.parametrize("launcher", ["console script", "python -m"])
def test_the_command_sets_openmp_before_torch_loads(launcher: str) -> None:
    command = ([_console_script()] if launcher == "console script"
               else [sys.executable, "-m", "metagrad"]) + ["--version"]
    default = _libgomp_report(command, **{ENV_VAR: "default"})
    assert int(default["GOMP_SPINCOUNT"]) > 0  # libgomp's own default spins (300,000 times in its docs)
    tuned = _libgomp_report(command)
    # libgomp read the setting (before torch loaded it, or it would not have)
    assert {name: tuned[name] for name in SETTING} == SETTING
    assert {name: default[name] for name in SETTING} != SETTING  # and it is not libgomp's own
    spins = SETTING.get("GOMP_SPINCOUNT") or ("0" if SETTING.get("OMP_WAIT_POLICY") == "PASSIVE" else None)
    if spins is not None:
        assert tuned["GOMP_SPINCOUNT"] == spins
    assert _libgomp_report(command, GOMP_SPINCOUNT="1234")["GOMP_SPINCOUNT"] == "1234"  # the user's wins


def test_bench_reports_the_setting_it_ran_with(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text("[meta]\nmeta_batch_size = 2\n")
    command = [sys.executable, "-m", "metagrad", "bench", "--config", str(config), "--iterations", "1",
               "--device", "cpu", "--json"]
    done = subprocess.run(command, env=_clean_environment(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    reported = {"OMP_WAIT_POLICY": result["omp_wait_policy"], "GOMP_SPINCOUNT": result["gomp_spincount"]}
    assert {name: reported[name] for name in SETTING} == SETTING
    assert all(f"{name}={value}" in done.stdout for name, value in SETTING.items())


def test_the_wait_setting_leaves_results_bit_for_bit(tmp_path: Path) -> None:
    # Two threads, so that the setting has waiting threads to govern; a small step, since spinning
    # threads beside other work (ACTIVE) are slow.
    script = tmp_path / "step.py"
    script.write_text(
        "import hashlib, torch, metagrad as mg\n"
        "torch.manual_seed(0)\n"
        "model = mg.build_model('omniglot-cnn', ways=3)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "episode = mg.Episode(torch.rand(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1),\n"
        "                     torch.rand(2, 6, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 2))\n"
        "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)\n"
        "mg.meta_train_step(mg.MAML(inner_lr=0.4, inner_steps=1), model, optimizer, episode)\n"
        "digest = hashlib.sha256()\n"
        "for p in model.parameters():\n"
        "    digest.update(p.detach().numpy().tobytes())\n"
        "print(torch.get_num_threads(), digest.hexdigest())\n")
    outputs = {}
    for name, env in {"active": {"OMP_WAIT_POLICY": "ACTIVE"}, "metagrad": SETTING}.items():
        done = subprocess.run([sys.executable, str(script)],
                              env=_clean_environment(OMP_NUM_THREADS="2", **env),
                              capture_output=True, text=True, check=True, timeout=300)
        outputs[name] = done.stdout.split()
    assert outputs["active"][0] == "2"
    assert outputs["active"] == outputs["metagrad"]


@needs_libgomp
def test_a_script_gets_the_commands_setting_from_tune_process() -> None:
    # metagrad.tune_process() as a script's first line: libgomp reads the setting when torch loads
    code = "import metagrad; metagrad.tune_process(); import torch; torch.ones(1) + 1; print('metagrad ok')"
    done = subprocess.run([sys.executable, "-c", code], env=_clean_environment(OMP_DISPLAY_ENV="VERBOSE"),
                          capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "metagrad ok"
    read = dict(re.findall(r"^\s*(OMP_WAIT_POLICY|GOMP_SPINCOUNT) = '([^']*)'", done.stderr, re.MULTILINE))
    assert {name: read[name] for name in SETTING} == SETTING
    mine = _python("import metagrad, os; metagrad.tune_process(); print(os.environ['GOMP_SPINCOUNT'])",
                   GOMP_SPINCOUNT="1234")
    assert mine == "1234"  # the user's own setting wins
    late = subprocess.run([sys.executable, "-c", "import torch, metagrad; metagrad.tune_process()"],
                          env=_clean_environment(), capture_output=True, text=True, timeout=120, check=False)
    assert late.returncode != 0 and "call metagrad.tune_process() before importing torch" in late.stderr


def test_every_public_name_loads_on_first_use() -> None:
    import metagrad

    # the lazily loaded names, and those defined in metagrad/__init__.py itself
    assert sorted(metagrad.__all__) == sorted([*metagrad._EXPORTS, "__version__", "tune_process"])
    for name in metagrad.__all__:
        assert getattr(metagrad, name) is not None
    assert set(metagrad.__all__) <= set(dir(metagrad))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        metagrad.nope  # noqa: B018


def test_help_documents_each_process_setting_and_its_switch(capsys: pytest.CaptureFixture[str]) -> None:
    from metagrad import _malloc
    from metagrad.cli import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert f"{ENV_VAR}  'default'" in text and f"{_malloc.ENV_VAR}    how" in text and "'keep'" in text
    assert all(f"{name}={value}" in text for name, value in SETTING.items())
