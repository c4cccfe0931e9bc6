"""metagrad asks OpenMP for passive waiting where it can take effect, and never overrides the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from metagrad._openmp import POLICY, prefer_passive_wait, spinning_warning


def test_sets_passive_when_unset_and_torch_not_loaded() -> None:
    environ: dict[str, str] = {}
    assert prefer_passive_wait(environ, modules=set()) == "set"
    assert environ == {"OMP_WAIT_POLICY": POLICY} and POLICY == "PASSIVE"


@pytest.mark.parametrize("value", ["ACTIVE", "passive", ""])
def test_keeps_the_users_policy(value: str) -> None:
    environ = {"OMP_WAIT_POLICY": value}
    assert prefer_passive_wait(environ, modules=set()) == "user"
    assert prefer_passive_wait(environ, modules={"torch"}) == "user"
    assert environ == {"OMP_WAIT_POLICY": value}


def test_leaves_the_environment_alone_once_torch_is_loaded() -> None:
    # libgomp read the variable when torch loaded it: setting it now would claim an effect it cannot have
    environ: dict[str, str] = {}
    assert prefer_passive_wait(environ, modules={"torch"}) == "torch first"
    assert environ == {}


def test_warns_only_where_threads_spin_because_torch_came_first() -> None:
    warning = spinning_warning("cpu", 2, "torch first")
    assert warning is not None and "Import metagrad before torch" in warning
    assert "OMP_WAIT_POLICY=PASSIVE" in warning
    assert spinning_warning("cpu", 1, "torch first") is None  # one thread: nothing waits
    assert spinning_warning("cuda", 2, "torch first") is None
    assert spinning_warning("cpu", 2, "set") is None and spinning_warning("cpu", 2, "user") is None


def _policy_after(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    code += "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_importing_metagrad_first_sets_it_in_a_fresh_process() -> None:
    assert _policy_after("import metagrad") == "PASSIVE"
    assert _policy_after("import metagrad", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _policy_after("import torch; import metagrad") == "None"


def test_the_command_line_runs_with_it_and_bench_reports_it(tmp_path) -> None:
    # `metagrad ...` and `python -m metagrad ...` import the package before torch
    config = tmp_path / "small.toml"
    config.write_text("[meta]\nmeta_batch_size = 2\n")
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "metagrad", "bench", "--config", str(config), "--iterations", "1",
               "--device", "cpu", "--json"]
    out = subprocess.run(command, env=environ, capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "OpenMP wait policy PASSIVE" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1])["omp_wait_policy"] == "PASSIVE"


def test_the_policy_leaves_results_bit_for_bit(tmp_path) -> None:
    # Two threads, so that the policy has waiting threads to govern; a small step, since spinning threads
    # beside other work (ACTIVE) are slow.
    script = tmp_path / "step.py"
    script.write_text(
        "import hashlib, torch, metagrad as mg\n"
        "torch.manual_seed(0)\n"
        "model = mg.build_model('omniglot-cnn', ways=3)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "episode = mg.Episode(torch.rand(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1),\n"
        "                     torch.rand(2, 6, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 2))\n"
        "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)\n"
        "mg.meta_train_step('maml', model, optimizer, episode, inner_lr=0.4, inner_steps=1)\n"
        "digest = hashlib.sha256()\n"
        "for p in model.parameters():\n"
        "    digest.update(p.detach().numpy().tobytes())\n"
        "print(torch.get_num_threads(), digest.hexdigest())\n")
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_NUM_THREADS": "2"}
    outputs = {}
    for policy in ("ACTIVE", "PASSIVE"):
        done = subprocess.run([sys.executable, str(script)], env=environ | {"OMP_WAIT_POLICY": policy},
                              capture_output=True, text=True, check=True, timeout=300)
        outputs[policy] = done.stdout.split()
    assert outputs["ACTIVE"][0] == "2"
    assert outputs["ACTIVE"] == outputs["PASSIVE"]
