"""metagrad against learn2learn 0.2.0, higher 0.2.1, TorchOpt 0.7.3, torch.func and parallel-metalearn 0.5.6:
speed, memory, gradients.

Speed (the default): for each thread setting (1 thread, torch's default), round and config, runs
``metagrad bench --preset ... --json`` and each peer's recipe (``peer_recipes.py``, in the peer's venv made
by ``setup_peers.sh``; torch.func with this interpreter) one after the other, each in its own process so
that peak RSS is per run. The order of the libraries is reversed every other round, so that none always
runs first on a machine whose load drifts. A cell is the median s/iter over rounds; the speed-up is the
median over rounds of the same-round ratio best peer s/iter / metagrad s/iter.

``--check``: in float64 on one fixed meta-batch (random images, the same initial weights), metagrad's
meta-gradient is written with the weights and tasks to a ``.pt`` file (tensors only, read with
``weights_only=True``); each peer computes its own from that file and reports the largest relative
difference. BatchNorm conventions are matched (batch statistics, eps 1e-3; learn2learn's ANIL body runs
on support and query separately, as metagrad's). When a vmapped recipe (torch.func's, parallel-metalearn's)
differs, the same recipe is run again with a loop over tasks (parallel-metalearn: its
``backend="sequential"``): if that one matches, the cell says "inexact" (torch's fused BatchNorm under
vmap) rather than "MISMATCH".

What is timed: metagrad's iteration includes task sampling (from a random uint8 dataset); the peers'
do not (one fixed meta-batch of random tensors), as in compare_learn2learn.py.

Prints a Markdown table, then one JSON line. A peer whose venv is missing is reported as missing.

Usage::

    bash benchmarks/setup_peers.sh                     # once: .bench/{l2l,higher,torchopt,pml}-venv
    python benchmarks/compare_peers.py --check                     # gradient equality, about a minute
    python benchmarks/compare_peers.py --configs a c --rounds 5 --iterations 10

On a GPU machine without the package registry: ``bash benchmarks/device_peer_wheels.sh`` here makes the
peers' wheels (``.whl/``); there, installed beside metagrad, ``--peers-here`` runs every peer with this
interpreter and ``--device cuda`` times every library on the GPU (peak memory then
``torch.cuda.max_memory_allocated``, as ``metagrad bench`` reports it); docs/PERFORMANCE.md has the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_learn2learn import RunFailed, run_json, run_library
from l2l_baseline import CONFIGS, IMAGE_SHAPES
from peer_recipes import PEERS, canonical_parameters

CONFIG_NAMES = ("a", "b", "c", "d")  # the second-order configs every peer can run
VENVS = {"learn2learn": "l2l-venv", "higher": "higher-venv", "torchopt": "torchopt-venv",
         "parallel-metalearn": "pml-venv"}
LABELS = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "TorchOpt",
          "torch.func": "torch.func", "parallel-metalearn": "parallel-metalearn"}
THREAD_SETTINGS = ("1", "default")
VMAPPED = {"torch.func", "parallel-metalearn"}  # peers whose recipe vmaps over tasks (--check reruns a loop)
CHECK_TOLERANCE = 1e-8


def find_peers(peers: list[str], bench_dir: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """``({peer: python}, {peer: why missing})``: a peer's venv counts once setup_peers.sh has marked it.

    ``bench_dir`` None: every peer from this interpreter (installed beside metagrad, as on a machine
    without the package registry), where it imports.
    """
    found, missing = {}, {}
    for peer in peers:
        if peer == "torch.func":
            found[peer] = sys.executable  # torch alone: metagrad's interpreter, without importing metagrad
            continue
        if bench_dir is None:
            command = [sys.executable, str(HERE / "peer_recipes.py"), "--peer", peer, "--import-only"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                found[peer] = sys.executable
            else:
                missing[peer] = f"does not import here: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
            continue
        venv = bench_dir / VENVS[peer]
        python = venv / "bin" / "python"
        if python.exists() and (venv / ".metagrad-peer-ok").exists():
            found[peer] = str(python)
        else:
            missing[peer] = f"no {venv} (run benchmarks/setup_peers.sh)"
    return found, missing


def library_order(libraries: list[str], round_index: int) -> list[str]:
    """The run order of a round: as given in even rounds, reversed in odd ones."""
    return list(libraries) if round_index % 2 == 0 else list(reversed(libraries))


def thread_env(base: dict[str, str], threads: str) -> dict[str, str]:
    """``threads`` "1": one intra-op thread for every library; "default": torch's own choice."""
    env = {k: v for k, v in base.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads != "default":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    return env


def peer_command(python: str, peer: str, config: str, args: argparse.Namespace) -> list[str]:
    return [python, str(HERE / "peer_recipes.py"), "--peer", peer, "--config", config,
            "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--device", args.device]


def metagrad_command(config: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "metagrad", "bench", "--preset", CONFIGS[config]["preset"],
            "--iterations", str(args.iterations), "--device", args.device, "--json"]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(config: str, runs: list[dict[str, Any]], peers: list[str]) -> dict[str, Any]:
    """Median s/iter per library, the median same-round speed-up against the round's fastest peer, and
    each library's peak memory (max over rounds)."""
    libraries = ["metagrad", *peers]
    sec = {lib: _median([r[lib]["sec_per_iter"] for r in runs if lib in r]) for lib in libraries}
    peak = {lib: max((r[lib]["peak_mem_mb"] for r in runs if lib in r), default=None) for lib in libraries}
    ratios, best_per_round = [], []
    for r in runs:
        timed = {p: r[p]["sec_per_iter"] for p in peers if p in r}
        if "metagrad" in r and timed:
            best = min(timed, key=timed.__getitem__)
            best_per_round.append(best)
            ratios.append(timed[best] / r["metagrad"]["sec_per_iter"])
    best_peer = statistics.mode(best_per_round) if best_per_round else None
    return {"config": config, "description": CONFIGS[config]["description"], "rounds": len(runs),
            "sec_per_iter": sec, "peak_mem_mb": peak, "speedup_vs_best_peer": _median(ratios),
            "speedup_per_round": ratios, "best_peer": best_peer}


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def speed_table(summaries: dict[str, list[dict[str, Any]]], peers: list[str], missing: dict[str, str]) -> str:
    """One row per thread setting and config: s/iter (peak MB) of each library, then the speed-up."""
    columns = ["metagrad", *peers, *missing]
    rows = ["| threads | config | " + " | ".join(f"{LABELS.get(c, c)} s/iter (peak MB)" for c in columns)
            + " | speed-up vs best peer |",
            "| --- | --- | " + " | ".join("---:" for _ in columns) + " | ---: |"]
    for threads, items in summaries.items():
        for s in items:
            cells = []
            for lib in columns:
                if lib in missing:
                    cells.append("missing")
                else:
                    sec, peak = s["sec_per_iter"][lib], s["peak_mem_mb"][lib]
                    cells.append(f"{_cell(sec, '.3f')} ({_cell(peak, '.0f')})")
            speedup = "n/a" if s["speedup_vs_best_peer"] is None else (
                f"{s['speedup_vs_best_peer']:.2f}x ({LABELS[s['best_peer']]})")
            rows.append(f"| {threads} | {s['config']} | " + " | ".join(cells) + f" | {speedup} |")
    return "\n".join(rows)


def check_cell(result: dict[str, Any] | None, tolerance: float) -> str:
    """``result``: a peer's check (``max_rel_diff``; a vmapped peer's possibly ``loop_max_rel_diff``)."""
    if result is None:
        return "n/a"
    if "missing" in result:
        return "missing"
    if "error" in result:
        return f"error: {result['error']}"
    diff = result["max_rel_diff"]
    if diff <= tolerance:
        return f"{diff:.1e}"
    loop = result.get("loop_max_rel_diff")
    if loop is not None and loop <= tolerance:
        return f"inexact: {diff:.1e} under vmap (torch's fused BatchNorm); {loop:.1e} with a loop over tasks"
    return f"MISMATCH {diff:.1e}"


def check_table(checks: dict[str, dict[str, dict[str, Any]]], peers: list[str], tolerance: float) -> str:
    rows = ["| config | " + " | ".join(LABELS[p] for p in peers) + " |",
            "| --- | " + " | ".join("---" for _ in peers) + " |"]
    for config, results in checks.items():
        cells = [check_cell(results.get(p), tolerance) for p in peers]
        rows.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_check_file(config: str, path: Path, *, tasks: int, ways: int | None = None, seed: int = 0) -> None:
    """Writes metagrad's float64 meta-gradient on random tasks of ``config``, with the weights and tasks."""
    import torch
    from l2l_baseline import _random_tasks

    import metagrad as mg
    from metagrad.models.layers import BatchNorm
    from metagrad.training.config import load_preset
    from metagrad.training.setup import make_model

    overrides = {"meta_batch_size": tasks, **({} if ways is None else {"ways": ways})}  # tests: fewer ways
    cfg = {**CONFIGS[config], **overrides}
    preset = load_preset(cfg["preset"])
    torch.manual_seed(seed)
    model = make_model(preset.model, cfg["ways"], IMAGE_SHAPES[cfg["model"]]).double()
    support_x, support_y, query_x, query_y = (
        t.double() if t.is_floating_point() else t
        for t in _random_tasks(cfg, torch.device("cpu"), torch.Generator().manual_seed(seed)))
    episode = mg.Episode(support_x, support_y, query_x, query_y)
    algorithm = mg.make(cfg["algorithm"], inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"])
    out = mg.meta_batch_loss(algorithm, model, dict(model.named_parameters()), {}, episode)
    out.loss.backward()
    ordered = canonical_parameters(model, (BatchNorm,))
    torch.save({"config": config, "overrides": overrides,
                "weights": [p.detach().clone() for p in ordered], "grads": [p.grad.clone() for p in ordered],
                "support_x": support_x, "support_y": support_y, "query_x": query_x, "query_y": query_y}, path)


def run_check(args: argparse.Namespace, pythons: dict[str, str], missing: dict[str, str]) -> int:
    checks: dict[str, dict[str, dict[str, Any]]] = {}
    env = thread_env(dict(os.environ), "default")
    with tempfile.TemporaryDirectory(prefix="metagrad-check-") as folder:
        for config in args.configs:
            path = Path(folder) / f"check-{config}.pt"
            start = time.perf_counter()
            write_check_file(config, path, tasks=args.check_tasks)
            print(f"check {config}: metagrad's meta-gradient ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
            checks[config] = {p: {"missing": why} for p, why in missing.items()}
            for peer, python in pythons.items():
                command = [python, str(HERE / "peer_recipes.py"), "--peer", peer, "--check-file", str(path)]
                try:
                    result = run_json(command, args.timeout, env)
                    if peer in VMAPPED and result["max_rel_diff"] > args.tolerance:
                        result["loop_max_rel_diff"] = run_json([*command, "--loop"], args.timeout,
                                                               env)["max_rel_diff"]
                except RunFailed as exc:
                    result = {"error": str(exc).splitlines()[-1][:200]}
                checks[config][peer] = result
                print(f"check {config} {peer}: {check_cell(result, args.tolerance)}", file=sys.stderr,
                      flush=True)
    peers = [*pythons, *missing]
    print(f"\nMeta-gradient check: float64, {args.check_tasks} random tasks per config, the same weights; "
          f"max relative difference to metagrad (tolerance {args.tolerance:g})\n")
    print(check_table(checks, peers, args.tolerance))
    failed = [f"{c} {p}" for c, results in checks.items() for p, r in results.items()
              if check_cell(r, args.tolerance).startswith(("MISMATCH", "error"))]
    print(json.dumps({"check": checks, "tolerance": args.tolerance, "tasks": args.check_tasks,
                      "failed": failed}))
    return 1 if failed else 0


def run_speed(args: argparse.Namespace, pythons: dict[str, str], missing: dict[str, str]) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    peers = list(pythons)
    summaries: dict[str, list[dict[str, Any]]] = {}
    all_runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failures: list[str] = []
    for threads in args.threads:
        env = thread_env(base, threads)
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
        for round_index in range(args.rounds):
            for config in args.configs:
                run: dict[str, Any] = {"round": round_index}
                for lib in library_order(["metagrad", *peers], round_index):
                    command = (metagrad_command(config, args) if lib == "metagrad"
                               else peer_command(pythons[lib], lib, config, args))
                    result = run_library(lib, config, command, env, args.timeout, failures,
                                         f"threads {threads} round {round_index + 1}/{args.rounds}")
                    if result is not None:
                        run[lib] = result
                runs[config].append(run)
        summaries[threads] = [summarize(c, runs[c], peers) for c in args.configs]
        all_runs[threads] = runs
    loads = [r[lib]["load_before"] for runs in all_runs.values() for rs in runs.values() for r in rs
             for lib in r if lib != "round"]
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"Python {platform.python_version()}")
    if loads and max(loads) > (os.cpu_count() or 1):
        print(f"Warning: the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} CPUs: other "
              "jobs shared the cores, so absolute times are inflated (same-round ratios less so).")
    memory = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"Device: {args.device}. Each cell: median of {args.rounds} interleaved rounds of "
          f"{args.iterations} timed iterations, {memory} in MB (max over rounds); speed-up = median of "
          "same-round (fastest peer / metagrad).")
    for peer, why in missing.items():
        print(f"{LABELS[peer]} missing: {why}")
    for peer in VMAPPED.intersection(peers):
        print(f"{LABELS[peer]} is timed as its example is written, though under vmap its second-order "
              "meta-gradient through torch's BatchNorm is inexact in torch 2.13 (MAML configs; see --check).")
    print()
    print(speed_table(summaries, peers, missing))
    report = {"machine": platform.machine(), "cpus": os.cpu_count(), "device": args.device,
              "rounds": args.rounds, "iterations": args.iterations, "max_load": max(loads, default=None),
              "missing": missing,
              "summaries": summaries, "runs": all_runs, "failures": failures}
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIG_NAMES), choices=CONFIG_NAMES,
                        metavar="NAME",
                        help=f"configs, from {', '.join(CONFIG_NAMES)} (default: all; l2l_baseline.CONFIGS)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, metavar="PEER",
                        help=f"peers, from {', '.join(PEERS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per run (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="the peers' untimed iterations (metagrad: 3)")
    parser.add_argument("--threads", nargs="+", default=list(THREAD_SETTINGS), choices=THREAD_SETTINGS,
                        help="thread settings, each a full set of rounds (default: 1 default)")
    parser.add_argument("--bench-dir", type=Path, default=HERE.parent / ".bench",
                        help="where setup_peers.sh made the venvs (default: .bench)")
    parser.add_argument("--peers-here", action="store_true",
                        help="run every peer with this interpreter, where it imports (peers installed beside "
                             "metagrad, e.g. from wheels on a machine without the package registry)")
    parser.add_argument("--device", default="cpu",
                        help="speed runs on this device: cpu (default) or cuda[:N]; --check stays on the CPU")
    parser.add_argument("--check", action="store_true", help="compare meta-gradients instead of timing")
    parser.add_argument("--check-tasks", type=int, default=2,
                        help="--check: tasks in the meta-batch (default 2)")
    parser.add_argument("--tolerance", type=float, default=CHECK_TOLERANCE,
                        help=f"--check: largest relative difference accepted (default {CHECK_TOLERANCE:g})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default: 1800)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iterations < 1 or args.check_tasks < 1:
        parser.error("--rounds, --iterations and --check-tasks must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pythons, missing = find_peers(args.peers, None if args.peers_here else args.bench_dir)
    for peer, why in missing.items():
        print(f"{LABELS[peer]} missing: {why}", file=sys.stderr)
    return run_check(args, pythons, missing) if args.check else run_speed(args, pythons, missing)


if __name__ == "__main__":
    raise SystemExit(main())
