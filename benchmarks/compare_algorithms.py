"""Algorithms against MAML at the same shapes, in one run: ``metagrad bench`` of each, interleaved.

Every arm times one preset's shapes (data, model, meta-batch, inner steps) with only the algorithm and
its own settings changed, one process per run (``python -m metagrad bench --json --config ARM.toml``),
rounds alternating the order; an arm's ratio is the median of the same-round ratios MAML s/iter / arm
s/iter (above 1: faster than MAML).

Usage::

    python benchmarks/compare_algorithms.py         # omniglot-maml-5w1s: maml, anil, boil, reptile
    python benchmarks/compare_algorithms.py --preset mini-imagenet-maml-5w1s --rounds 3 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ARMS = {
    "maml": "",
    "anil": 'algorithm = "anil"',
    "boil": 'algorithm = "boil"',
    # Reptile at MAML's shapes: the same inner steps on the whole support set, SGD as MAML's
    "reptile": 'algorithm = "reptile"\ninner_optimizer = "sgd"',
}


def _run(preset: str, toml: Path, iterations: int) -> dict:
    command = [sys.executable, "-m", "metagrad", "bench", "--preset", preset, "--config", str(toml),
               "--iterations", str(iterations), "--json"]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="omniglot-maml-5w1s", help="the shapes every arm times")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per run (the median)")
    args = parser.parse_args(argv)
    arms = ["maml", *[a for a in args.arms if a != "maml"]]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as folder:
        tomls = {arm: Path(folder) / f"{arm}.toml" for arm in arms}
        for arm, path in tomls.items():
            path.write_text(f"[meta]\n{ARMS[arm]}\n", encoding="utf-8")
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else arms[::-1]:
                times[arm].append(_run(args.preset, tomls[arm], args.iterations)["sec_per_iter"])
                print(f"round {round_ + 1} {arm}: {times[arm][-1]:.3f} s/iter", file=sys.stderr, flush=True)
    result = {arm: {"sec_per_iter": statistics.median(t), "rounds": t,
                    "vs_maml": statistics.median(m / a for m, a in zip(times["maml"], t))}
              for arm, t in times.items()}
    for arm, r in result.items():
        print(f"{arm:8s} {r['sec_per_iter']:.3f} s/iter  {r['vs_maml']:.2f}x MAML's speed")
    print(json.dumps({"preset": args.preset, "iterations": args.iterations, "arms": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
