"""metagrad.bench: a tiny config runs end to end and reports the documented fields (no timing assertions)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from repo_scripts import load_script

from metagrad.bench import run_bench
from metagrad.errors import ConfigError
from metagrad.training.config import (
    Config,
    DataConfig,
    MetaConfig,
    ModelConfig,
    RunConfig,
    list_presets,
    load_preset,
)

REQUIRED = ("sec_per_iter", "tasks_per_sec", "peak_mem_mb")


def tiny_config(algorithm: str = "maml", first_order: bool = False) -> Config:
    return Config(
        preset="tiny",
        data=DataConfig(dataset="omniglot", ways=2, shots=1, query_shots=1),
        model=ModelConfig(name="omniglot-cnn", hidden_size=4),
        meta=MetaConfig(algorithm=algorithm, first_order=first_order, inner_steps=1, meta_batch_size=2),
        run=RunConfig(device="cpu"),
    )


@pytest.mark.parametrize("algorithm, first_order", [("maml", False), ("maml", True), ("anil", False)])
def test_run_bench_reports_fields(algorithm: str, first_order: bool) -> None:
    result = run_bench(tiny_config(algorithm, first_order), iterations=2, warmup=1, report=False,
                       matmul_size=256)
    for key in REQUIRED + ("gflop_per_iter", "gflops", "matmul_gflops", "peak_fraction"):
        assert result[key] > 0, key
    assert len(result["times"]) == 2
    assert result["tasks_per_sec"] == pytest.approx(2 / result["sec_per_iter"])
    assert (result["algorithm"], result["ways"], result["meta_batch_size"]) == (algorithm, 2, 2)
    assert result["first_order"] == first_order
    assert result["strategy"] == "batched"  # the standard networks take the fastest strategy


def test_peak_reached_before_the_steps_is_said(capsys: pytest.CaptureFixture) -> None:
    # a process that already used more memory (as `bench --check` does) must not pass it off as the steps'
    ballast = torch.ones(200 * 2**18)  # 200 MB, touched, then freed
    del ballast
    result = run_bench(tiny_config(), iterations=1, warmup=0, count_flops=False)
    assert result["peak_mem_before_steps_mb"] >= result["peak_mem_mb"] - 1
    assert "reached before the timed steps" in capsys.readouterr().out


@pytest.mark.parametrize("learned", ["per-parameter", "per-layer-per-step"])
def test_bench_runs_learned_rates_and_the_first_iterations_maml_plus_plus_settings(learned: str) -> None:
    base = tiny_config()
    meta = dataclasses.replace(base.meta, inner_steps=2, learned_inner_lr=learned, iterations_per_epoch=5,
                               msl_epochs=2, first_order_epochs=1)
    result = run_bench(dataclasses.replace(base, meta=meta), iterations=1, warmup=0, report=False,
                       count_flops=False)
    reported = (result["learned_inner_lr"], result["multi_step_loss"], result["first_order"])
    assert reported == (learned, True, True)
    assert result["sec_per_iter"] > 0


@pytest.mark.parametrize("preset", [name for name in list_presets() if "mamlpp" in name])
def test_every_mamlpp_preset_benches(preset: str) -> None:
    # the preset's task shapes, inner steps and MAML++ options (BNWB included) on a narrow network
    config = load_preset(preset)
    config = replace(config, model=replace(config.model, hidden_size=4),
                     meta=replace(config.meta, meta_batch_size=1))
    result = run_bench(config, iterations=1, warmup=0, report=False, count_flops=False)
    assert (result["per_step_bn"], result["learned_inner_lr"], result["multi_step_loss"]) == (
        True, "per-layer-per-step", True)
    assert result["strategy"] == "batched" and result["sec_per_iter"] > 0


def test_json_output_is_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    run_bench(tiny_config(), iterations=1, warmup=0, json_output=True, count_flops=False)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert all(key in result for key in REQUIRED)
    assert result["gflops"] is None


def test_rejects_no_iterations() -> None:
    with pytest.raises(ConfigError, match="iterations"):
        run_bench(tiny_config(), iterations=0)


def test_rejects_unknown_dataset_shape() -> None:
    config = tiny_config()
    config = replace(config, data=replace(config.data, dataset="tiny"))
    with pytest.raises(ConfigError, match="unknown dataset"):
        run_bench(config, iterations=1, report=False)


def test_kernel_benchmark_fused_batch_norm_is_exact_at_second_order() -> None:
    # docs/PERFORMANCE.md reports this BatchNorm's timings; they only mean something if it is exact.
    bench = load_script("benchmarks/bench_kernels.py")
    assert bench.check_fused_bn() < 1e-10
    x, gamma, beta, _ = bench._bn_inputs((3, 4, 2, 5), torch.float64, seed=1)
    assert torch.autograd.gradgradcheck(bench._fused_bn, (x, gamma, beta))


def test_kernel_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("benchmarks/bench_kernels.py")
    assert bench.main(["--iterations", "1", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["batch_norm_second_order"]) == 4
    assert {row["layout"] for row in result["conv_input_gradient"]} == {"ordinary", "grouped"}
    assert all(row["conv_transpose_channels_last_ms"] > 0 for row in result["conv_input_gradient"])


@pytest.mark.parametrize("l2l_malloc", ["default", "keep"])
def test_compare_gives_learn2learn_the_allocator_setting_only_when_asked(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], l2l_malloc: str) -> None:
    compare = load_script("benchmarks/compare_learn2learn.py")
    envs: dict[str, dict[str, str]] = {}

    def fake_run(command: list[str], timeout: float, env: dict[str, str]) -> dict:
        lib = "l2l" if "l2l_baseline.py" in " ".join(command) else "metagrad"
        envs[lib] = env
        return {"sec_per_iter": 2.0 if lib == "l2l" else 1.0, "peak_mem_mb": 100.0, "load_before": 0.0,
                "threads": 1}

    monkeypatch.delenv("METAGRAD_MALLOC", raising=False)
    monkeypatch.setattr(compare, "setup_learn2learn", lambda python: ("l2l-python", None))
    monkeypatch.setattr(compare, "run_json", fake_run)
    monkeypatch.setattr(compare, "check_shapes", lambda config, result: None)
    assert compare.main(["--configs", "c", "--rounds", "1", "--l2l-malloc", l2l_malloc,
                         "--omp-wait-policy", "PASSIVE"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from metagrad import _malloc

    assert report["l2l_malloc"] == l2l_malloc and report["metagrad_malloc"] == _malloc.command_mode()
    assert report["metagrad_malloc"] in ("huge", "keep")
    assert report["summaries"][0]["speedup"] == 2.0
    assert "MALLOC_MMAP_MAX_" not in envs["metagrad"]  # metagrad sets its own, in-process
    assert (envs["l2l"].get("MALLOC_MMAP_MAX_") == "0") == (l2l_malloc == "keep")
    # both libraries wait alike (learn2learn alone would get libgomp's spinning default)
    assert envs["l2l"]["OMP_WAIT_POLICY"] == envs["metagrad"]["OMP_WAIT_POLICY"] == report["omp_wait_policy"]
    # or each as installed: metagrad's command sets its own, learn2learn gets libgomp's default
    assert compare.main(["--configs", "c", "--rounds", "1", "--omp-wait-policy", "installed"]) == 0
    assert not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & ({*envs["l2l"]} | {*envs["metagrad"]})


def test_compare_loop_times_each_way_against_learn2learn_in_the_same_round(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    compare = load_script("benchmarks/compare_learn2learn.py")
    commands: list[str] = []

    def fake_run(command: list[str], timeout: float, env: dict[str, str]) -> dict:
        text = " ".join(command)
        commands.append(text)
        network = command[command.index("--network") + 1] if "--network" in command else command[
            command.index("--child-batched") + 1]
        seconds = 2.0 if "--library learn2learn" in text else 1.0 if "--child-batched" in text else 2.5
        return {"sec_per_iter": seconds * (3 if network == "user" else 1), "load_before": 0.0}

    monkeypatch.setattr(compare, "setup_learn2learn", lambda python: ("l2l-python", None))
    monkeypatch.setattr(compare, "run_json", fake_run)
    assert compare.main(["--loop", "--rounds", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ratios = {(r["way"], r["network"]): r["speedup_vs_l2l"] for r in report["summaries"]}
    assert ratios[("compat", "library")] == ratios[("compat", "user")] == 0.8
    assert ratios[("batched", "library")] == ratios[("batched", "user")] == 2.0
    assert ratios[("batched", "user-layers")] == 6.0  # against learn2learn on the user's own network
    assert len(commands) == 2 * 7 and sum("l2l-python" in c for c in commands) == 2 * 2
    assert all("--library metagrad" in c for c in commands
               if "l2l_baseline.py" in c and "l2l-python" not in c)


def test_loop_ways_compute_the_same_meta_gradient() -> None:
    """The compat loop (l2l_baseline's code through metagrad's layer) and the batched rewrite's call give
    the user network the same meta-gradient, in float64 on 2 tasks."""
    import torch

    compare = load_script("benchmarks/compare_learn2learn.py")
    baseline = load_script("benchmarks/l2l_baseline.py")
    import metagrad

    cfg = {**baseline.CONFIGS["a"], "meta_batch_size": 2}
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        looped = baseline.user_network(cfg["ways"])
        batched = compare.batched_network("user", cfg["ways"])
        batched.load_state_dict(looped.state_dict())
        tasks = [t.double() if t.is_floating_point() else t
                 for t in baseline._random_tasks(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))]
        meta_backward, _ = baseline.make_meta_backward(baseline.import_library("metagrad"), cfg, looped)
        meta_backward(*tasks)
        maml = metagrad.MAML(inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"])
        out = metagrad.meta_batch_loss(maml, batched, dict(batched.named_parameters()),
                                       dict(batched.named_buffers()), metagrad.Episode(*tasks))
        out.loss.backward()
    finally:
        torch.set_default_dtype(torch.float32)
    for (name, p), q in zip(looped.named_parameters(), batched.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    for b, c in zip(looped.buffers(), batched.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12)


def test_chunk_budget_times_each_budget_and_puts_the_default_back(capsys) -> None:
    from metagrad.algorithms import strategies

    script = load_script("benchmarks/chunk_budget.py")
    default = strategies.CPU_CHUNK_ELEMENTS
    assert script.main(["--config", "c", "--threads", "1", "--budgets", "19", "whole", "--rounds", "1",
                        "--iterations", "1", "--no-torch-func"]) == 0
    assert strategies.CPU_CHUNK_ELEMENTS == default
    out = capsys.readouterr().out
    assert "budget 19" in out and "budget whole" in out and "torch.func" not in out
