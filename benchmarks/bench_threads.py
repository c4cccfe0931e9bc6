"""CPU threads and OpenMP wait policy, on idle cores and beside a busy neighbour.

A user trains in one terminal and evaluates in another; two runs share a small machine; CI runs beside
a training. This times ``metagrad bench``'s meta-training step on the CPU, also where a GPU is present (a
preset's shapes on random data: task sampling, meta-batch loss, backward, Adam) in a child process for
each arm:

- ``torch-default``: torch's default thread count (one per core) and libgomp's default wait policy
  (the child imports torch before metagrad, so metagrad leaves ``OMP_WAIT_POLICY`` alone);
- ``metagrad``: the same threads, with what importing metagrad first gives (``OMP_WAIT_POLICY=PASSIVE``,
  see ``metagrad/_openmp.py``);
- ``one-thread``: ``OMP_NUM_THREADS=1``, the README's advice for several runs on one CPU;

in each scenario:

- ``idle``: nothing else started by this script;
- ``neighbour``: one single-thread process running the same step in a loop, started in a new session
  (``setsid``, as a run started from another terminal is): Linux's autogroup scheduling then shares the
  cores between the two sessions, not between their threads.

The arms alternate within each round. A child that passes ``--child-timeout`` is stopped and reported
with the iterations it finished (the slowest arm can take minutes per iteration). Each child prints
one JSON line; the summary line gives each arm's median seconds per iteration and its speed-up against
``torch-default`` in the same scenario (above 1: faster). Stop other work on the machine first
(``pkill -STOP -f "metagrad train"``, then ``pkill -CONT``), or the idle scenario is not idle.

Usage::

    python benchmarks/bench_threads.py                        # 2 rounds, omniglot-maml-5w1s
    python benchmarks/bench_threads.py --rounds 1 --iterations 3 --scenarios neighbour
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS = ("torch-default", "metagrad", "one-thread")
SCENARIOS = ("idle", "neighbour")


def child(preset: str, iterations: int, warmup: int, torch_first: bool) -> None:
    """Print one JSON line with the settings in effect, then one per timed iteration."""
    # The first import decides: metagrad first sets OMP_WAIT_POLICY (unless set), torch first keeps
    # libgomp's default.
    importlib.import_module("torch" if torch_first else "metagrad")
    import torch

    from metagrad.bench import run_bench

    config = cpu_preset(preset)
    print(json.dumps({"threads": torch.get_num_threads(), "device": config.run.device,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}), flush=True)
    # One bench call per iteration, so that a child stopped by the timeout has reported what it did
    # (each call builds its own random data and model, outside the timed step).
    for i in range(warmup + iterations):
        result = run_bench(config, iterations=1, warmup=0, count_flops=False, report=False)
        if i >= warmup:
            print(json.dumps({"sec": result["sec_per_iter"]}), flush=True)


def cpu_preset(preset: str) -> Any:
    """The preset on the CPU: the device "auto" would time a GPU where there is one."""
    from metagrad.training.config import resolve_config

    return resolve_config(preset=preset, overrides={"run.device": "cpu"})


def neighbour_command(preset: str) -> list[str]:
    """A single-thread process running ``preset``'s step until killed."""
    return [sys.executable, __file__, "--neighbour-loop", "--preset", preset]


def run_arm(arm: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if arm == "one-thread":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--iterations",
           str(args.iterations), "--warmup", str(args.warmup)]
    if arm == "torch-default":
        cmd.append("--torch-first")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=args.child_timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    times = [line["sec"] for line in lines if "sec" in line]
    settings = lines[0] if lines and "threads" in lines[0] else {}
    return {"arm": arm, "scenario": scenario, **settings, "times": times, "timed_out": timed_out,
            "wall_s": time.perf_counter() - start,
            # a stopped child's unfinished iteration took at least what was left of the timeout
            "sec_per_iter": statistics.median(times) if times and not timed_out else None,
            "load_avg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="omniglot-maml-5w1s")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per child")
    parser.add_argument("--child-timeout", type=float, default=120.0,
                        help="seconds before a child is stopped and reported as timed out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--neighbour-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.preset, args.iterations, args.warmup, args.torch_first)
        return 0
    if args.neighbour_loop:
        import torch

        from metagrad.bench import run_bench

        torch.set_num_threads(1)
        config = cpu_preset(args.preset)
        while True:
            run_bench(config, iterations=10, warmup=0, count_flops=False, report=False)

    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
                      "autogroup": autogroup.read_text().strip() if autogroup.exists() else None,
                      "preset": args.preset}), flush=True)
    runs: list[dict[str, Any]] = []
    for scenario in args.scenarios:
        neighbour = None
        if scenario == "neighbour":
            neighbour = subprocess.Popen(neighbour_command(args.preset), start_new_session=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
            time.sleep(5)  # past its start-up
        try:
            for r in range(args.rounds):
                shift = r % len(args.arms)
                for arm in args.arms[shift:] + args.arms[:shift]:
                    run = {**run_arm(arm, scenario, args), "round": r}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
        finally:
            if neighbour is not None:
                os.killpg(neighbour.pid, signal.SIGKILL)
                neighbour.wait()
    summary: dict[str, Any] = {"baseline": "torch-default"}
    for scenario in args.scenarios:
        medians = {}
        for arm in args.arms:
            done = [r for r in runs if r["arm"] == arm and r["scenario"] == scenario]
            if any(r["timed_out"] for r in done):
                finished = [t for r in done for t in r["times"]]
                medians[arm] = None
                summary[f"{scenario}/{arm}"] = (f"timed out ({args.child_timeout:.0f} s per child); "
                                                f"iterations finished: {[round(t, 2) for t in finished]}")
            else:
                medians[arm] = statistics.median(t for r in done for t in r["times"])
                summary[f"{scenario}/{arm}_sec_per_iter"] = medians[arm]
        base = medians.get("torch-default")
        for arm, sec in medians.items():
            if sec is not None and arm != "torch-default":
                # a timed-out baseline spent over child_timeout on warmup + iterations
                bound = args.child_timeout / (args.warmup + args.iterations) / sec
                summary[f"{scenario}/{arm}_speedup"] = (base / sec if base
                                                        else f"> {bound:.0f} (baseline timed out)")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
