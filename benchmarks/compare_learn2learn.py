"""metagrad against learn2learn 0.2.0, interleaved in one run: seconds per iteration, ratio, peak memory.

For each round and each config, runs learn2learn's baseline (``l2l_baseline.py`` in the venv made by
``setup_peers.sh``) and ``metagrad bench --preset ... --json`` (this interpreter) one after the
other, each in its own process so that peak RSS is per run; the order alternates between rounds so
that neither library always runs second on a machine whose load drifts. The speed-up of a config is
the median over rounds of the same-round ratio learn2learn s/iter / metagrad s/iter.

Prints a Markdown table, then one JSON line with every run. When learn2learn cannot be set up, says so
and still reports metagrad's figures.

Note what is timed: metagrad's iteration includes task sampling (from a random uint8 dataset); the
baseline's does not (one fixed meta-batch of random tensors), as in the issue's measurements.

The C allocator: ``metagrad bench`` tunes glibc's malloc (``metagrad._malloc``), which learn2learn does
not do out of the box. ``--l2l-malloc keep`` gives learn2learn the ``keep`` setting through glibc's
environment variables (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``), to compare with
``METAGRAD_MALLOC=keep``; ``METAGRAD_MALLOC=default`` in the environment turns metagrad's off.

``--loop``: the user's side instead of the presets'. learn2learn's own loop (``maml_omniglot.py``:
``clone()``, ``adapt()``, one ``backward()`` per task; ``l2l_baseline.py``) on config a, timed three
ways per round, each in its own process, the order rotating between rounds: learn2learn; the same code
through metagrad's learn2learn layer (only the import changed); and the smallest metagrad code doing the
same meta-update batched (:func:`batched_step`, docs/MIGRATION.md shows it). Each on learn2learn's
``OmniglotCNN`` ("library"; metagrad's layer gives its own) and on a user's torch network
(``l2l_baseline.user_network``: ``BatchNorm2d``, max-pooling); the batched rewrite also on that network
built from metagrad's layers ("user-layers"). The ratios are same-round learn2learn s/iter over each.

Usage::

    python benchmarks/compare_learn2learn.py                      # configs a a-fo b c d, 3 rounds
    python benchmarks/compare_learn2learn.py --configs a c d --rounds 5 --iterations 20
    python benchmarks/compare_learn2learn.py --configs d --l2l-malloc keep   # same allocator for both
    python benchmarks/compare_learn2learn.py --loop --threads 1 --rounds 5   # the learn2learn loop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from l2l_baseline import CONFIGS, META_LR  # (the configs live beside the baseline; it needs no metagrad)

from metagrad import _malloc

SHAPE_KEYS = ("algorithm", "model", "ways", "shots", "query_shots", "meta_batch_size", "inner_steps",
              "first_order")


class RunFailed(RuntimeError):
    """A benchmark subprocess exited non-zero or printed no JSON result."""


def setup_learn2learn(l2l_python: str | None) -> tuple[str | None, str | None]:
    """Returns ``(python, None)`` for a working learn2learn interpreter, or ``(None, reason)``."""
    if l2l_python:
        command = [l2l_python, str(HERE / "l2l_baseline.py"), "--check"]
    else:
        command = ["bash", str(HERE / "setup_peers.sh"), "l2l"]
    print(f"setting up learn2learn: {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        return None, f"`{' '.join(command)}` exited {proc.returncode}: {tail}"
    print(f"learn2learn ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return (l2l_python or proc.stdout.strip().splitlines()[-1].split(" ", 1)[1]), None  # "l2l PYTHON"


def run_json(command: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs ``command`` and parses its last stdout line as JSON; adds the load average before the run."""
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(command)}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RunFailed(f"exit {proc.returncode}: {' '.join(command)}\n{tail}")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise RunFailed(f"no JSON on the last line of {' '.join(command)}: {lines[-1][:200]}") from None
    result["load_before"] = load
    return result


def run_library(lib: str, config: str, command: list[str], env: dict[str, str], timeout: float,
                failures: list[str], where: str) -> dict[str, Any] | None:
    """One library's timed run of ``config``: its JSON result (metagrad's shapes checked), or None after
    noting the failure in ``failures``. ``where`` (the round, the threads) starts the progress line."""
    try:
        result = run_json(command, timeout, env)
        if lib == "metagrad":
            check_shapes(config, result)
    except RunFailed as exc:
        failures.append(str(exc))
        print(f"FAILED {lib} {config}: {exc}", file=sys.stderr, flush=True)
        return None
    print(f"{where} {config:>4} {lib:>11}: {result['sec_per_iter']:.3f} s/iter, "
          f"{result['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
    return result


def l2l_command(python: str, config: str, args: argparse.Namespace) -> list[str]:
    return [python, str(HERE / "l2l_baseline.py"), "--config", config, "--iterations", str(args.iterations),
            "--warmup", str(args.warmup), "--device", args.device]


def metagrad_command(config: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "metagrad", "bench", "--preset", CONFIGS[config]["preset"],
            "--iterations", str(args.iterations), "--device", args.device, "--json"]


LOOP_CONFIG = "a"  # maml_omniglot.py's shapes: Omniglot 5-way 1-shot, 32 tasks, 1 step, second order
LOOP_WAYS = {  # way -> (--network of l2l_baseline.py, or of batched_step)
    "l2l": ("library", "user"), "compat": ("library", "user"), "batched": ("library", "user", "user-layers")}


def batched_network(network: str, ways: int) -> Any:
    """The network of :func:`batched_step`: metagrad's OmniglotCNN (what its learn2learn layer's
    ``OmniglotCNN`` is), the user's torch network, or that network built from metagrad's layers."""
    from l2l_baseline import user_network

    from metagrad.models import layers
    from metagrad.models.conv4 import OmniglotCNN

    if network == "library":
        return OmniglotCNN(ways, strided=True)
    if network == "user":
        return user_network(ways)
    if network != "user-layers":
        raise ValueError(f"unknown network {network!r}")
    # user_network with metagrad's Conv2d, BatchNorm (batch statistics, no buffers) and MaxPool2d
    blocks: list[Any] = []
    for c_in in [1, 64, 64, 64]:
        blocks += [layers.Conv2d(c_in, 64, 3, padding=1), layers.BatchNorm(64, eps=1e-5), torch.nn.ReLU(),
                   layers.MaxPool2d(2)]
    return torch.nn.Sequential(*blocks, layers.Flatten(), layers.Linear(64, ways))


def batched_step(network: str, iterations: int, warmup: int) -> dict[str, Any]:
    """Times the batched rewrite of the learn2learn loop on config a (random tasks as l2l_baseline's)."""
    import resource
    import statistics as stats

    from l2l_baseline import _random_tasks

    import metagrad

    cfg = CONFIGS[LOOP_CONFIG]
    torch.manual_seed(0)
    model = batched_network(network, cfg["ways"])
    episode = metagrad.Episode(*_random_tasks(cfg, torch.device("cpu"), torch.Generator().manual_seed(0)))
    # --- the code docs/MIGRATION.md shows ---
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    maml = metagrad.MAML(inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"])

    def step() -> None:
        optimizer.zero_grad()
        out = metagrad.meta_batch_loss(maml, model, params, buffers, episode)
        out.loss.backward()
        optimizer.step()
    # ---
    times = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"library": "metagrad", "way": "batched", "network": network, "config": LOOP_CONFIG,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sec_per_iter": stats.median(times),
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "times": times}


def loop_command(way: str, network: str, l2l_python: str, args: argparse.Namespace) -> list[str]:
    if way == "batched":
        return [sys.executable, __file__, "--child-batched", network, "--iterations", str(args.iterations),
                "--warmup", str(args.warmup)]
    python, library = (l2l_python, "learn2learn") if way == "l2l" else (sys.executable, "metagrad")
    return [python, str(HERE / "l2l_baseline.py"), "--config", LOOP_CONFIG, "--library", library,
            "--network", network, "--iterations", str(args.iterations), "--warmup", str(args.warmup)]


def compare_loop(l2l_python: str, args: argparse.Namespace, env: dict[str, str]) -> int:
    """``--loop``: the learn2learn loop, its import changed, and the batched rewrite, interleaved."""
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    order = [(way, network) for way, networks in LOOP_WAYS.items() for network in networks]
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for way, network in order[shift:] + order[:shift]:
            try:
                result = run_json(loop_command(way, network, l2l_python, args), args.timeout, env)
            except RunFailed as exc:
                failures.append(str(exc))
                print(f"FAILED {way} {network}: {exc}", file=sys.stderr, flush=True)
                continue
            runs.append({**result, "way": way, "network": network, "round": round_index})
            print(f"round {round_index + 1}/{args.rounds} {way:>7} {network:>11}: "
                  f"{result['sec_per_iter']:.3f} s/iter", file=sys.stderr, flush=True)

    def seconds(way: str, network: str, round_index: int) -> float | None:
        return next((r["sec_per_iter"] for r in runs if (r["way"], r["network"], r["round"])
                     == (way, network, round_index)), None)

    rows = ["| network | way | s/iter (median) | learn2learn / this, per round | median |",
            "| --- | --- | ---: | --- | ---: |"]
    summaries = []
    for way, network in order:
        mine = [r["sec_per_iter"] for r in runs if (r["way"], r["network"]) == (way, network)]
        base = "user" if network == "user-layers" else network  # learn2learn runs the user's own network
        ratios = [b / m for i in range(args.rounds)
                  if (b := seconds("l2l", base, i)) and (m := seconds(way, network, i))]
        summary = {"way": way, "network": network, "sec_per_iter": _median(mine),
                   "speedup_vs_l2l": _median(ratios), "speedup_per_round": ratios}
        summaries.append(summary)
        if way == "l2l":
            rows.append(f"| {network} | {way} | {_fmt(summary['sec_per_iter'], '.3f')} | (the baseline) | |")
            continue
        rows.append(f"| {network} | {way} | {_fmt(summary['sec_per_iter'], '.3f')} | "
                    f"{', '.join(f'{r:.2f}' for r in ratios)} | {_fmt(summary['speedup_vs_l2l'], '.2f')}x |")
    loads = [r["load_before"] for r in runs]
    print(f"\nlearn2learn's loop on config {LOOP_CONFIG} ({CONFIGS[LOOP_CONFIG]['description']}), "
          f"{args.rounds} interleaved rounds of {args.iterations} timed iterations, threads "
          f"{args.threads if args.threads is not None else 'default'}, 1-minute load "
          f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} on {os.cpu_count()} CPUs")
    print("\n".join(rows))
    report = {"mode": "loop", "config": LOOP_CONFIG, "threads": args.threads, "rounds": args.rounds,
              "iterations": args.iterations, "max_load": max(loads, default=None), "summaries": summaries,
              "runs": runs, "failures": failures}
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 1 if failures else 0


def check_shapes(config: str, result: dict[str, Any]) -> None:
    """The metagrad preset must time the same shapes as the baseline ("fomaml" is maml first order)."""
    expected = CONFIGS[config]
    got = dict(result)
    if got.get("algorithm") == "fomaml":
        got["algorithm"] = "maml"
    wrong = {k: (expected[k], got.get(k)) for k in SHAPE_KEYS if expected[k] != got.get(k)}
    if wrong:
        raise RunFailed(f"config {config}: preset {expected['preset']} differs from the baseline "
                        f"(expected, got): {wrong}")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(config: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; the speed-up is the median of same-round ratios."""
    def values(lib: str, key: str) -> list[float]:
        return [r[lib][key] for r in runs if r.get(lib) and r[lib].get(key) is not None]

    ratios = [r["l2l"]["sec_per_iter"] / r["metagrad"]["sec_per_iter"] for r in runs
              if r.get("l2l") and r.get("metagrad")]
    mem_ratios = [r["metagrad"]["peak_mem_mb"] / r["l2l"]["peak_mem_mb"] for r in runs
                  if r.get("l2l") and r.get("metagrad")]
    return {
        "config": config,
        "description": CONFIGS[config]["description"],
        "preset": CONFIGS[config]["preset"],
        "rounds": len(runs),
        "l2l_sec_per_iter": _median(values("l2l", "sec_per_iter")),
        "metagrad_sec_per_iter": _median(values("metagrad", "sec_per_iter")),
        "speedup": _median(ratios),
        "speedup_per_round": ratios,
        "l2l_peak_mem_mb": max(values("l2l", "peak_mem_mb"), default=None),
        "metagrad_peak_mem_mb": max(values("metagrad", "peak_mem_mb"), default=None),
        "mem_ratio": _median(mem_ratios),
        "metagrad_gflops": _median(values("metagrad", "gflops")),
        "metagrad_peak_fraction": _median(values("metagrad", "peak_fraction")),
    }


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    rows = [
        ("| config | setting | learn2learn s/iter | metagrad s/iter | speed-up | learn2learn peak MB "
         "| metagrad peak MB | metagrad GFLOP/s (% of matmul) |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        flops = "n/a" if s["metagrad_gflops"] is None else (
            f"{s['metagrad_gflops']:.0f} ({100 * s['metagrad_peak_fraction']:.0f}%)")
        rows.append(
            f"| {s['config']} | {s['description']} | {_fmt(s['l2l_sec_per_iter'], '.3f')} "
            f"| {_fmt(s['metagrad_sec_per_iter'], '.3f')} | {_fmt(s['speedup'], '.2f')}x "
            f"| {_fmt(s['l2l_peak_mem_mb'], '.0f')} | {_fmt(s['metagrad_peak_mem_mb'], '.0f')} | {flops} |"
        )
    return "\n".join(rows)


def machine_line(results: list[dict[str, Any]]) -> str:
    first = next((r for r in results if r), {})
    return (f"{first.get('device_name') or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"device {first.get('device', '?')}, torch {first.get('torch', '?')}, "
            f"metagrad {first.get('metagrad', '?')}, Python {platform.python_version()}")


def _threads(results: list[dict[str, Any] | None]) -> str:
    return str(next((r["threads"] for r in results if r), "?"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"configs to run, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per run (default: 10)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="learn2learn's untimed iterations (metagrad: 3)")
    parser.add_argument("--device", default="cpu", help="device for both libraries (default: cpu)")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads for both libraries (OMP_NUM_THREADS; default: torch's "
                             "choice). On a machine shared with other jobs, 1 thread is far steadier: 2 "
                             "OpenMP threads that must meet at every small operator slow down when cores "
                             "are busy (many-fold if they spin: see --omp-wait-policy)")
    parser.add_argument("--omp-wait-policy", choices=("installed", "PASSIVE", "ACTIVE"),
                        default=os.environ.get("OMP_WAIT_POLICY", "").upper() or "installed",
                        help="OpenMP waiting: each library as installed (metagrad's command sets its own, "
                             "learn2learn gets libgomp's default), or this OMP_WAIT_POLICY for both "
                             "(default: $OMP_WAIT_POLICY, else installed); matters from 2 threads on")
    parser.add_argument("--l2l-python",
                        help="a python with learn2learn 0.2.0 (default: run setup_peers.sh l2l)")
    parser.add_argument("--l2l-malloc", choices=("default", "keep"), default="default",
                        help="learn2learn's C allocator: as it runs out of the box (default), or "
                             "keeping freed memory as metagrad's commands do (glibc's MALLOC_MMAP_MAX_=0 "
                             "MALLOC_TRIM_THRESHOLD_=2147483647)")
    parser.add_argument("--no-baseline", action="store_true", help="report metagrad alone")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default: 1800)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--loop", action="store_true",
                        help="learn2learn's own loop against it through metagrad's layer and the batched "
                             "rewrite (see the module docstring); --configs is not used")
    parser.add_argument("--child-batched", choices=LOOP_WAYS["batched"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_batched:
        print(json.dumps(batched_step(args.child_batched, args.iterations, args.warmup)), flush=True)
        return 0

    l2l_python, unavailable = (None, "--no-baseline given") if args.no_baseline else setup_learn2learn(
        args.l2l_python)
    if unavailable:
        print(f"learn2learn baseline unavailable: {unavailable}\nreporting metagrad alone", file=sys.stderr)

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if args.omp_wait_policy != "installed":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy  # the same for both libraries
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.loop:
        if l2l_python is None:
            print("--loop compares against learn2learn, which is unavailable", file=sys.stderr)
            return 1
        return compare_loop(l2l_python, args, env)
    l2l_env = {**env, **_malloc.GLIBC_KEEP_ENV} if args.l2l_malloc == "keep" else env
    metagrad_malloc = _malloc.command_mode(env)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    failures: list[str] = []
    for round_index in range(args.rounds):
        for config in args.configs:
            libraries = ["l2l", "metagrad"] if round_index % 2 == 0 else ["metagrad", "l2l"]
            run: dict[str, Any] = {"round": round_index}
            for lib in libraries:
                if lib == "l2l" and l2l_python is None:
                    continue
                command = (l2l_command(l2l_python, config, args) if lib == "l2l"
                           else metagrad_command(config, args))
                result = run_library(lib, config, command, l2l_env if lib == "l2l" else env, args.timeout,
                                     failures, f"round {round_index + 1}/{args.rounds}")
                if result is not None:
                    run[lib] = result
            runs[config].append(run)

    summaries = [summarize(config, runs[config]) for config in args.configs]
    mg_results = [r.get("metagrad") for rs in runs.values() for r in rs]
    loads = [r[lib]["load_before"] for rs in runs.values() for r in rs for lib in ("l2l", "metagrad")
             if lib in r]
    print(f"\nMachine: {machine_line(mg_results)}, {_threads(mg_results)} threads")
    if loads and max(loads) > (os.cpu_count() or 1):
        print(f"Warning: the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} CPUs "
              "during the runs: other jobs shared the cores, so absolute times are inflated "
              "(ratios less so).")
    print(f"C allocator: learn2learn {args.l2l_malloc}, metagrad {metagrad_malloc} "
          "(keep = freed memory stays in the heap; see --help)")
    print(f"Each cell: median of {args.rounds} interleaved rounds of {args.iterations} timed iterations; "
          "speed-up = median of same-round learn2learn/metagrad ratios; peak MB = max over rounds "
          "(RSS on CPU, max allocated on CUDA).")
    if unavailable:
        print(f"learn2learn baseline unavailable: {unavailable}")
    print()
    print(markdown_table(summaries))
    report = {"machine": machine_line(mg_results), "device": args.device, "threads": args.threads,
              "omp_wait_policy": args.omp_wait_policy,
              "l2l_malloc": args.l2l_malloc, "metagrad_malloc": metagrad_malloc,
              "max_load": max(loads, default=None), "rounds": args.rounds,
              "iterations": args.iterations, "baseline_unavailable": unavailable, "summaries": summaries,
              "runs": runs, "failures": failures}
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
