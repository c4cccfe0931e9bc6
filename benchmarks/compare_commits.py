"""Two commits of metagrad in one run: ``metagrad bench`` of each, interleaved, and the ratio.

Each commit is checked out into a temporary git worktree and run as ``python -m metagrad bench --json``
with that worktree's ``src`` first on ``PYTHONPATH`` (this interpreter's torch), one process per run so
that peak RSS is per run. Rounds alternate which commit runs first, so neither always runs on a machine
whose load has drifted; a config's ratio is the median of the same-round ratios base s/iter / new s/iter
(above 1: the new commit is faster). ``--base-env`` / ``--new-env`` add environment variables to one side,
so that ``-`` (the working tree) against itself compares process settings.

Usage::

    python benchmarks/compare_commits.py BASE [NEW]          # NEW defaults to the working tree
    python benchmarks/compare_commits.py HEAD~3 --configs a c d --rounds 5 --threads 1
    python benchmarks/compare_commits.py - --base-env METAGRAD_MALLOC=keep   # one tree, two allocators
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from l2l_baseline import CONFIGS  # the configs a, b, c, d live beside the baseline


def _bench(src: Path, preset: str, iterations: int, threads: int | None,
           extra_env: dict[str, str]) -> dict[str, Any]:
    # the code is compared, not the process tuning: a thread count that follows the load would differ
    # between the two commits' runs (an older commit ignores the variable)
    env = {**os.environ, "PYTHONPATH": str(src), "METAGRAD_THREADS": "fixed", **extra_env}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "metagrad", "bench", "--preset", preset, "--iterations", str(iterations),
               "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _values(runs: list[dict[str, Any]], config: str, label: str, key: str) -> list[float]:
    return [x[key] for x in runs if x["config"] == config and x["commit"] == label]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare against (any git revision; - the working tree)")
    parser.add_argument("new", nargs="?", help="the new commit (default: the working tree)")
    parser.add_argument("--base-env", nargs="+", default=[], metavar="NAME=VALUE",
                        help="environment variables for the base's runs only")
    parser.add_argument("--new-env", nargs="+", default=[], metavar="NAME=VALUE",
                        help="environment variables for the new commit's runs only")
    parser.add_argument("--configs", nargs="+", default=["a", "c", "d"], choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per run (default: 10)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: torch's own)")
    args = parser.parse_args()
    # "-" is the working tree (to git, "-" would be the previously checked-out branch)
    args.base, args.new = (None if rev == "-" else rev for rev in (args.base, args.new))
    extra = {}
    for label, pairs in (("base", args.base_env), ("new", args.new_env)):
        if any("=" not in pair for pair in pairs):
            parser.error(f"--{label}-env takes NAME=VALUE pairs, got {pairs}")
        extra[label] = dict(pair.split("=", 1) for pair in pairs)

    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for label, rev in (("base", args.base), ("new", args.new)):
            if rev is None:
                sources[label] = ROOT / "src"
                continue
            tree = Path(tmp) / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev],
                           check=True)
            sources[label] = tree / "src"
        runs: list[dict[str, Any]] = []
        try:
            for r in range(args.rounds):
                for name in args.configs:
                    order = ("base", "new") if r % 2 == 0 else ("new", "base")
                    for label in order:
                        preset = CONFIGS[name]["preset"]
                        result = _bench(sources[label], preset, args.iterations, args.threads,
                                        extra[label])
                        runs.append({"round": r, "config": name, "commit": label, **result})
                        print(f"round {r} config {name} {label}: {result['sec_per_iter']:.4f} s/iter "
                              f"{result['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
        finally:
            for label, rev in (("base", args.base), ("new", args.new)):
                if rev is not None:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(Path(tmp) / label)], check=False)

    print(f"| config | base s/iter | new s/iter | base / new (median of {args.rounds} same-round ratios) "
          "| base MB | new MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.configs:
        med = {(label, key): statistics.median(_values(runs, name, label, key))
               for label in ("base", "new") for key in ("sec_per_iter", "peak_mem_mb")}
        ratios = [b / n for b, n in zip(_values(runs, name, "base", "sec_per_iter"),
                                        _values(runs, name, "new", "sec_per_iter"))]
        print(f"| {name} {CONFIGS[name]['description']} | {med['base', 'sec_per_iter']:.4f} "
              f"| {med['new', 'sec_per_iter']:.4f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {med['base', 'peak_mem_mb']:.0f} "
              f"| {med['new', 'peak_mem_mb']:.0f} |")
    print(json.dumps({"base": args.base or "working tree", "new": args.new or "working tree",
                      "base_env": extra["base"], "new_env": extra["new"], "threads": args.threads,
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
