"""benchmarks/compare_peers.py, peer_recipes.py and time_to_accuracy.py: the parts that time nothing.

Tables, ratios, argument parsing, the parameter order shared by every library, the training clock's marks
and resumption; and, where ``setup_peers.sh`` has made the peers' venvs, each peer's meta-gradient against
metagrad's on a small float64 meta-batch.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_scripts import ROOT, load_script

from metagrad.models.layers import BatchNorm
from metagrad.training.config import load_preset
from metagrad.training.setup import make_model

compare = load_script("benchmarks/compare_peers.py")
recipes = load_script("benchmarks/peer_recipes.py")
tta = load_script("benchmarks/time_to_accuracy.py")


def _run(sec: float, peak: float = 100.0) -> dict:
    return {"sec_per_iter": sec, "peak_mem_mb": peak}


def test_summary_takes_same_round_ratios_against_the_fastest_peer() -> None:
    runs = [
        {"round": 0, "metagrad": _run(1.0), "learn2learn": _run(3.0, 300), "higher": _run(2.0)},
        {"round": 1, "metagrad": _run(2.0, 150), "learn2learn": _run(3.0), "higher": _run(8.0)},
        {"round": 2, "metagrad": _run(1.0), "higher": _run(5.0)},  # learn2learn failed this round
    ]
    s = compare.summarize("a", runs, ["learn2learn", "higher"])
    assert s["speedup_per_round"] == [2.0, 1.5, 5.0]  # higher, learn2learn, higher: each round's fastest
    assert s["speedup_vs_best_peer"] == 2.0 and s["best_peer"] == "higher"
    assert s["sec_per_iter"] == {"metagrad": 1.0, "learn2learn": 3.0, "higher": 5.0}
    assert s["peak_mem_mb"] == {"metagrad": 150, "learn2learn": 300, "higher": 100.0}
    table = compare.speed_table({"1": [s]}, ["learn2learn", "higher"], {"torchopt": "no venv"})
    assert "| 1 | a | 1.000 (150) | 3.000 (300) | 5.000 (100) | missing | 2.00x (higher) |" in table
    assert table.splitlines()[0].count("|") == table.splitlines()[1].count("|")


def test_summary_without_peers_reports_no_ratio() -> None:
    s = compare.summarize("c", [{"round": 0, "metagrad": _run(1.0)}], [])
    assert s["speedup_vs_best_peer"] is None and s["best_peer"] is None
    assert compare.speed_table({"default": [s]}, [], {}).splitlines()[-1].endswith("| n/a |")


def test_rounds_alternate_order_and_threads_reach_every_library() -> None:
    libs = ["metagrad", "learn2learn", "torch.func"]
    assert compare.library_order(libs, 0) == libs
    assert compare.library_order(libs, 1) == libs[::-1]
    env = compare.thread_env({"OMP_NUM_THREADS": "7", "PATH": "/bin"}, "1")
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1" and env["PATH"] == "/bin"
    assert "OMP_NUM_THREADS" not in compare.thread_env({"OMP_NUM_THREADS": "7"}, "default")


def test_check_cells_tell_match_inexact_mismatch_and_missing() -> None:
    tol = 1e-8
    assert compare.check_cell({"max_rel_diff": 1e-13}, tol) == "1.0e-13"
    assert compare.check_cell({"max_rel_diff": 0.5}, tol) == "MISMATCH 5.0e-01"
    inexact = compare.check_cell({"max_rel_diff": 0.5, "loop_max_rel_diff": 1e-14}, tol)
    assert inexact.startswith("inexact: 5.0e-01 under vmap") and "1.0e-14 with a loop" in inexact
    assert compare.check_cell({"max_rel_diff": 0.5, "loop_max_rel_diff": 0.4}, tol) == "MISMATCH 5.0e-01"
    assert compare.check_cell({"missing": "no venv"}, tol) == "missing"
    table = compare.check_table({"a": {"higher": {"max_rel_diff": 0.0}}}, ["higher", "torchopt"], tol)
    assert table.splitlines()[-1] == "| a | 0.0e+00 | n/a |"


def test_arguments_and_missing_peers(tmp_path: Path) -> None:
    args = compare.parse_args([])
    assert args.configs == ["a", "b", "c", "d"] and args.threads == ["1", "default"] and not args.check
    assert compare.parse_args(["--check", "--configs", "c", "--peers", "higher"]).peers == ["higher"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--configs", "a-fo"])  # first order: compare_learn2learn.py's
    with pytest.raises(SystemExit):
        compare.parse_args(["--rounds", "0"])
    (tmp_path / "higher-venv" / "bin").mkdir(parents=True)
    (tmp_path / "higher-venv" / "bin" / "python").touch()  # not marked ready by setup_peers.sh
    found, missing = compare.find_peers(["higher", "torchopt", "torch.func"], tmp_path)
    assert set(found) == {"torch.func"} and set(missing) == {"higher", "torchopt"}
    (tmp_path / "higher-venv" / ".metagrad-peer-ok").touch()
    assert "higher" in compare.find_peers(["higher"], tmp_path)[0]


def test_device_and_peers_from_this_interpreter() -> None:
    args = compare.parse_args(["--device", "cuda", "--peers-here", "--iterations", "4"])
    assert args.peers_here and args.device == "cuda"
    assert compare.metagrad_command("d", args)[-3:] == ["--device", "cuda", "--json"]
    assert compare.peer_command("py", "higher", "d", args)[-2:] == ["--device", "cuda"]
    assert compare.parse_args([]).device == "cpu"
    # no venvs: each peer from this interpreter where it imports (metagrad's test venv has none of them)
    found, missing = compare.find_peers(["higher", "torch.func"], None)
    assert found["torch.func"] == sys.executable
    if importlib.util.find_spec("higher") is None:
        assert missing["higher"].startswith("does not import here:")
    else:
        assert found["higher"] == sys.executable


def test_recipe_run_reports_its_device_and_memory_kind() -> None:
    result = recipes.run("torch.func", "c", iterations=1, warmup=0, device="cpu")
    assert (result["device"], result["peak_mem_kind"], len(result["times"])) == ("cpu", "rss", 1)


@pytest.mark.parametrize("config", ["a", "b", "c", "d"])
def test_every_library_orders_the_same_tensors_alike(config: str) -> None:
    cfg = recipes.CONFIGS[config]
    model = make_model(load_preset(cfg["preset"]).model, cfg["ways"], recipes.IMAGE_SHAPES[cfg["model"]])
    ours = [tuple(p.shape) for p in recipes.canonical_parameters(model, (BatchNorm,))]
    peers = [tuple(p.shape) for p in recipes.canonical_parameters(recipes.build_network(cfg))]
    assert ours == peers and len(ours) == 18
    x = torch.rand(3, *recipes.IMAGE_SHAPES[cfg["model"]])
    assert recipes.build_network(cfg)(x).shape == model(x).shape == (3, cfg["ways"])


def test_relative_difference_has_a_floor_for_zero_gradients() -> None:
    want = [torch.tensor([2.0, -4.0]), torch.tensor([0.0])]  # a conv bias before BatchNorm: zero
    assert recipes.max_relative_difference([torch.tensor([2.0, -4.0]), torch.tensor([1e-15])], want) < 1e-12
    assert recipes.max_relative_difference([torch.tensor([2.0, -3.0]), torch.tensor([0.0])], want) == 0.25


def _venv_python(peer: str) -> Path | None:
    if peer == "torch.func":
        return None
    venv = ROOT / ".bench" / compare.VENVS[peer]
    return venv / "bin" / "python" if (venv / ".metagrad-peer-ok").exists() else None


@pytest.mark.slow  # a float64 second-order step in a fresh process per case: about a minute in all
@pytest.mark.parametrize("peer", ["learn2learn", "higher", "torchopt", "torch.func", "parallel-metalearn"])
@pytest.mark.parametrize("config", ["a", "c"])
def test_peer_meta_gradient_equals_metagrads(peer: str, config: str, tmp_path: Path) -> None:
    python = _venv_python(peer) if peer != "torch.func" else Path(sys.executable)
    if python is None:
        pytest.skip(f"no {compare.VENVS[peer]} under .bench/ (bash benchmarks/setup_peers.sh makes it)")
    path = tmp_path / "check.pt"
    compare.write_check_file(config, path, tasks=1, ways=2)
    command = [str(python), str(ROOT / "benchmarks" / "peer_recipes.py"), "--peer", peer, "--check-file",
               str(path)]
    if peer in compare.VMAPPED and config == "a":
        command.append("--loop")  # under vmap torch's fused BatchNorm is inexact at second order
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    assert json.loads(out.stdout.splitlines()[-1])["max_rel_diff"] < 1e-9


def test_time_to_accuracy_arguments_and_table() -> None:
    args = tta.parse_args(["--budget-s", "100", "--marks", "50", "20", "150"])
    assert args.marks == [20, 50, 100]  # sorted, past the budget dropped, the budget itself a mark
    assert tta.parse_args(["--budget-s", "130"]).marks == [30, 60, 120, 130]
    with pytest.raises(SystemExit):
        tta.parse_args(["--marks", "0"])
    assert tta.parse_args(["--set", "meta.meta_batch_size=8", "--set=meta.meta_lr=0.003"]).set == [
        "meta.meta_batch_size=8", "meta.meta_lr=0.003"]
    for bad in (["--set", "meta.no_such_key=1"], ["--set", "meta_lr"], ["--set", "meta.meta_batch_size=0"],
                ["--preset", "mini-imagenet-maml-5w1s"]):
        with pytest.raises(SystemExit):
            tta.parse_args(bad)
    rows = [{"mark_s": m, "train_s": m + 1, "iterations": i, "test_accuracy": a, "test_ci95": 0.01}
            for i, (m, a) in enumerate([(0, 0.2), (20, 0.85), (50, 0.93)])]
    assert tta.seconds_to_reach(rows, 0.8) == 21 and tta.seconds_to_reach(rows, 0.95) is None
    table = tta.markdown({"metagrad": rows, "learn2learn": rows[:1]}, [0.8, 0.95], [20, 50])
    assert "| 80% | 21 | not reached |" in table and "| 95% | not reached | not reached |" in table
    assert "| 20 | 85.00 ± 1.00% (1) | n/a |" in table


def test_time_to_accuracy_learn2learn_cnn_takes_the_presets_recipe_or_refuses_it() -> None:
    recipe = tta.preset_recipe(tta.metagrad_config(tta.parse_args(["--preset", "omniglot-maml-5w1s-fast"])))
    assert recipe == {"ways": 5, "shots": 1, "query_shots": 1, "hidden_size": 64, "inner_lr": 0.4,
                      "inner_steps": 1, "test_inner_steps": 10, "first_order": False, "meta_lr": 0.003,
                      "lr_schedule": "cosine", "min_meta_lr": 0.0001, "iterations": 10000,
                      "meta_batch_size": 16, "seed": 0}
    assert tta.preset_recipe(tta.metagrad_config(tta.parse_args(["--preset", "omniglot-fomaml-5w1s"])))[
        "first_order"]
    for preset, named in [("omniglot-metasgd-5w1s", "learned_inner_lr"), ("omniglot-anil-5w1s", "algorithm"),
                          ("omniglot-mamlpp-5w1s", "MAML++")]:
        with pytest.raises(ValueError, match=named):
            tta.preset_recipe(tta.metagrad_config(tta.parse_args(["--preset", preset])))
        with pytest.raises(SystemExit):  # refused before anything runs
            tta.parse_args(["--preset", preset, "--libraries", "learn2learn-cnn"])
        assert tta.parse_args(["--preset", preset]).libraries == ["metagrad", "learn2learn"]
    assert tta.parse_args([]).libraries == ["metagrad", "learn2learn", "learn2learn-cnn"]


def test_time_to_accuracy_clock_evaluates_at_marks_and_resumes(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(tta.time, "perf_counter", lambda: now[0])
    saved: dict[str, dict] = {}

    def step() -> None:
        now[0] += 4.0  # each iteration takes 4 s of the training clock

    def save(path: Path, state: dict) -> None:
        saved[str(path)] = dict(state)
        path.write_text("checkpoint")

    args = tta.parse_args(["--budget-s", "10", "--marks", "5", "--log", str(tmp_path / "lib.jsonl")])
    clock = tta.Clock("lib", args)
    assert clock.resume(lambda path: saved[str(path)]) is None
    clock.train(step, lambda: [1.0, 0.0], save)
    rows = tta.read_rows(tmp_path / "lib.jsonl")
    assert [(r["mark_s"], r["train_s"], r["iterations"]) for r in rows] == [(0, 0, 0), (5, 8, 2), (10, 12, 3)]
    assert rows[-1]["test_accuracy"] == 0.5 and rows[-1]["test_tasks"] == 2
    # Interrupted after the checkpoint of mark 5: the rows after it are dropped and mark 10 is redone.
    saved[str(tmp_path / "lib.ckpt")] = {"train_s": 8.0, "iterations": 2}
    again = tta.Clock("lib", args)
    assert again.resume(lambda path: saved[str(path)])["iterations"] == 2
    assert again.pending() == [10]
    again.train(step, lambda: [1.0], save)
    rows = tta.read_rows(tmp_path / "lib.jsonl")
    assert [(r["mark_s"], r["iterations"]) for r in rows] == [(0, 0), (5, 2), (10, 3)]
