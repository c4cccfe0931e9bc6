"""OpenMP wait settings at torch's default threads, on idle cores and beside a busy neighbour, in one run.

A user trains in one terminal and evaluates in another; two runs share a small machine; CI runs beside
a training. This times ``metagrad bench``'s meta-training step on the CPU, also where a GPU is present (a
preset's shapes on random data: task sampling, meta-batch loss, backward, Adam), one child process per
arm, each arm an environment:

- ``metagrad``: what the ``metagrad`` command does: its OpenMP setting before torch loads
  (``metagrad._openmp.SETTING``), then threads that follow the free cores (``metagrad.training.threads``);
- ``follow-spin-N``: ``GOMP_SPINCOUNT=N`` with threads that follow the free cores, e.g. ``follow-spin-30000``;
- ``libgomp-default``: neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` set (spin 300,000 times, then
  sleep): what a script that imports torch gets;
- ``passive``, ``active``: ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) or ``ACTIVE`` (spin always);
- ``spin-N``: ``GOMP_SPINCOUNT=N`` (spin N times, then sleep), e.g. ``spin-10000``;
- ``one-thread``: ``OMP_NUM_THREADS=1``, the reference of the neighbour target;
- ``learn2learn``: learn2learn 0.2.0's ``clone()``/``adapt()`` loop on the same shapes
  (``l2l_baseline.py``; needs ``setup_peers.sh l2l`` or ``--l2l-python``) as installed: torch's default
  threads and libgomp's default waiting. Idle scenario only.

in two scenarios:

- ``idle``: nothing else started by this script;
- ``neighbour``: one single-thread process running the same step in a loop, started in a new session
  (``setsid``, as a run started from another terminal is): Linux's autogroup scheduling then shares the
  cores between the two sessions, not between their threads.

Each round runs both scenarios (the neighbour is started and stopped within the round), the arms in a
rotated order, so that the load of a shared machine drifts over every arm alike. A child that passes
``--child-timeout`` is stopped and reported with the iterations it finished. Each child's run is one JSON
line; the last line summarises each arm: median, spread and worst step, and the two targets, idle
speed-up against learn2learn (``idle_vs_learn2learn``, target >= 1.6) and the worst step beside the
neighbour against the one-thread arm's median there (``neighbour_worst_vs_one_thread``, target <= 2).
A Markdown table of the same goes to stderr. On a machine shared with other work the idle scenario is
not idle: the load average is recorded with every run.

Usage::

    python benchmarks/bench_threads.py                          # 3 rounds, omniglot-maml-5w1s
    python benchmarks/bench_threads.py --arms metagrad spin-3000 one-thread --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ARMS = ("metagrad", "libgomp-default", "passive", "active", "spin-1000", "spin-10000", "spin-100000",
        "one-thread", "learn2learn")
SCENARIOS = ("idle", "neighbour")
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "METAGRAD_OMP_WAIT",
                    "METAGRAD_THREADS")
IDLE_TARGET = 1.6  # metagrad at least this many times learn2learn's speed on idle cores
NEIGHBOUR_TARGET = 2.0  # no step beside the neighbour slower than this many one-thread steps


def arm_environment(arm: str) -> dict[str, str]:
    """The OpenMP variables of ``arm`` (the ``metagrad`` arm's are set in the child, as the command does)."""
    if arm in ("metagrad", "libgomp-default", "learn2learn"):
        return {}
    if arm in ("passive", "active"):
        return {"OMP_WAIT_POLICY": arm.upper()}
    if arm == "one-thread":
        return {"OMP_NUM_THREADS": "1"}
    match = re.fullmatch(r"(?:follow-)?spin-(\d+)", arm)
    if match is None:
        raise ValueError(f"unknown arm {arm!r}: expected one of {', '.join(ARMS)}, spin-N or follow-spin-N")
    return {"GOMP_SPINCOUNT": match.group(1)}


def child(preset: str, iterations: int, warmup: int, tune: bool, follow: bool) -> None:
    """Print one JSON line with the settings in effect, then one per timed iteration."""
    if tune:  # as metagrad/__main__.py does, before torch loads
        from metagrad import _openmp

        _openmp.tune_wait()
    import torch

    from metagrad.bench import run_bench
    from metagrad.training import threads

    if follow:  # as metagrad/cli.py does for train, eval and bench
        threads.follow_free_cores()

    config = cpu_preset(preset)
    print(json.dumps({"threads": torch.get_num_threads(), "device": config.run.device,
                      **{name: os.environ.get(name) for name in OPENMP_VARIABLES[:2]}}), flush=True)
    # One bench call per iteration, so that a child stopped by the timeout has reported what it did
    # (each call builds its own random data and model, outside the timed step).
    for i in range(warmup + iterations):
        result = run_bench(config, iterations=1, warmup=0, count_flops=False, report=False)
        if i >= warmup:
            print(json.dumps({"sec": result["sec_per_iter"], "threads_now": torch.get_num_threads()}),
                  flush=True)


def cpu_preset(preset: str) -> Any:
    """The preset on the CPU: the device "auto" would time a GPU where there is one."""
    from metagrad.training.config import resolve_config

    return resolve_config(preset=preset, overrides={"run.device": "cpu"})


def l2l_config(preset: str) -> str | None:
    """The name of ``l2l_baseline.py``'s config with ``preset``'s shapes, if there is one."""
    sys.path.insert(0, str(HERE))
    from l2l_baseline import CONFIGS

    return next((name for name, config in CONFIGS.items() if config["preset"] == preset), None)


def neighbour_command(preset: str) -> list[str]:
    """A single-thread process running ``preset``'s step until killed."""
    return [sys.executable, __file__, "--neighbour-loop", "--preset", preset]


def arm_command(arm: str, args: argparse.Namespace) -> list[str]:
    if arm == "learn2learn":
        return [args.l2l_python, str(HERE / "l2l_baseline.py"), "--config", l2l_config(args.preset) or "?",
                "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    command = [sys.executable, __file__, "--child", "--preset", args.preset, "--iterations",
               str(args.iterations), "--warmup", str(args.warmup)]
    return command + (["--tune"] if arm == "metagrad" else []) + (
        ["--follow"] if arm == "metagrad" or arm.startswith("follow-") else [])


def run_arm(arm: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES} | arm_environment(arm)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(arm_command(arm, args), stdout=subprocess.PIPE, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=args.child_timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if arm == "learn2learn":
        times = lines[-1]["times"] if lines and "times" in lines[-1] else []
        settings = {"threads": lines[-1]["threads"]} if lines and "threads" in lines[-1] else {}
    else:
        times = [line["sec"] for line in lines if "sec" in line]
        settings = lines[0] if lines and "threads" in lines[0] else {}
    return {"arm": arm, "scenario": scenario, **settings, "times": times, "timed_out": timed_out,
            "wall_s": time.perf_counter() - start, "load_avg_before": load}


def summarize(runs: list[dict[str, Any]], arms: list[str], scenarios: list[str],
              child_timeout: float) -> dict[str, Any]:
    """Per scenario and arm: median, per-round medians, worst step; then the two targets per arm."""
    summary: dict[str, Any] = {}
    medians: dict[tuple[str, str], float | None] = {}
    worst: dict[tuple[str, str], float | None] = {}
    for scenario in scenarios:
        for arm in arms:
            done = [r for r in runs if r["arm"] == arm and r["scenario"] == scenario]
            if not done:
                continue
            times = [t for r in done for t in r["times"]]
            stalled = any(r["timed_out"] for r in done)
            medians[scenario, arm] = statistics.median(times) if times and not stalled else None
            # a stopped child's unfinished step took at least what was left of the timeout
            worst[scenario, arm] = None if stalled else max(times, default=None)
            summary[f"{scenario}/{arm}"] = {
                "median_s": medians[scenario, arm],
                "round_medians_s": [statistics.median(r["times"]) if r["times"] else None for r in done],
                "min_s": min(times, default=None), "worst_s": worst[scenario, arm],
                "steps": len(times),
                "timed_out": f"a child passed {child_timeout:.0f} s" if stalled else None}
    base = medians.get(("idle", "learn2learn"))
    one = medians.get(("neighbour", "one-thread"))
    for arm in arms:
        if arm == "learn2learn":
            continue
        idle = medians.get(("idle", arm))
        if base and idle:
            summary[f"idle/{arm}"]["vs_learn2learn"] = base / idle
        if one and ("neighbour", arm) in worst:
            summary[f"neighbour/{arm}"]["worst_vs_one_thread"] = (
                None if worst["neighbour", arm] is None else worst["neighbour", arm] / one)
    return summary


def markdown(summary: dict[str, Any], arms: list[str]) -> str:
    def cell(entry: dict[str, Any] | None, key: str) -> str:
        if entry is None:
            return "-"
        if entry["timed_out"]:
            return "stalled"
        value = entry.get(key)
        return "-" if value is None else f"{value:.2f}"

    rows = [("| arm | idle s/iter (round medians) | idle vs learn2learn | beside neighbour s/iter "
             "| worst step | worst / one-thread median |"),
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for arm in arms:
        idle, near = summary.get(f"idle/{arm}"), summary.get(f"neighbour/{arm}")
        rounds = "" if idle is None else ", ".join("-" if m is None else f"{m:.2f}"
                                                   for m in idle["round_medians_s"])
        rows.append(f"| {arm} | {cell(idle, 'median_s')} ({rounds}) | {cell(idle, 'vs_learn2learn')} "
                    f"| {cell(near, 'median_s')} | {cell(near, 'worst_s')} | "
                    f"{cell(near, 'worst_vs_one_thread')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="omniglot-maml-5w1s")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), metavar="ARM",
                        help=f"from {', '.join(ARMS)}, spin-N or follow-spin-N (default: all those)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per child")
    parser.add_argument("--child-timeout", type=float, default=60.0,
                        help="seconds before a child is stopped and reported as stalled")
    parser.add_argument("--l2l-python",
                        help="a python with learn2learn 0.2.0 (default: run setup_peers.sh l2l)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--neighbour-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for arm in args.arms:
        arm_environment(arm)  # an unknown arm fails here, before anything runs
    if args.child:
        child(args.preset, args.iterations, args.warmup, args.tune, args.follow)
        return 0
    if args.neighbour_loop:
        import torch

        from metagrad.bench import run_bench

        torch.set_num_threads(1)
        config = cpu_preset(args.preset)
        while True:
            run_bench(config, iterations=10, warmup=0, count_flops=False, report=False)

    if "learn2learn" in args.arms:
        if l2l_config(args.preset) is None:
            parser.error(f"learn2learn has no config with {args.preset}'s shapes (l2l_baseline.CONFIGS)")
        if args.l2l_python is None:
            setup = subprocess.run(["bash", str(HERE / "setup_peers.sh"), "l2l"], capture_output=True,
                                   text=True, check=False)
            if setup.returncode != 0:
                parser.error(f"setup_peers.sh l2l failed: {setup.stderr.strip()[-500:]}")
            args.l2l_python = setup.stdout.strip().splitlines()[-1].split(" ", 1)[1]  # "l2l PYTHON"
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
                      "autogroup": autogroup.read_text().strip() if autogroup.exists() else None,
                      "preset": args.preset, "arms": args.arms}), flush=True)
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        shift = r % len(args.arms)
        order = args.arms[shift:] + args.arms[:shift]
        for scenario in args.scenarios:
            neighbour = None
            if scenario == "neighbour":
                neighbour = subprocess.Popen(neighbour_command(args.preset), start_new_session=True,
                                             env={**os.environ, "OMP_NUM_THREADS": "1"})
                time.sleep(5)  # past its start-up
            try:
                for arm in order:
                    if arm == "learn2learn" and scenario != "idle":
                        continue
                    run = {**run_arm(arm, scenario, args), "round": r}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
            finally:
                if neighbour is not None:
                    os.killpg(neighbour.pid, signal.SIGKILL)
                    neighbour.wait()
    summary = summarize(runs, args.arms, args.scenarios, args.child_timeout)
    print(markdown(summary, args.arms), file=sys.stderr, flush=True)
    print(json.dumps({"targets": {"idle_vs_learn2learn": IDLE_TARGET,
                                  "neighbour_worst_vs_one_thread": NEIGHBOUR_TARGET},
                      "load_avg_after": os.getloadavg()[0], **summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
