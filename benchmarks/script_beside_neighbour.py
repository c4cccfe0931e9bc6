"""A user's script beside a busy process: the README's Python snippet with and without
``metagrad.tune_process()``, and with ``OMP_NUM_THREADS=1``, each in its own process, interleaved.

A neighbour (one Python process spinning on the CPU) runs throughout. Each arm times ``--steps`` meta-batch
steps of Omniglot-shaped random tasks (MAML 5-way 1-shot, 32 tasks, metagrad's own network) after one
warm-up step and reports the median and the worst step.

Usage::

    python benchmarks/script_beside_neighbour.py --rounds 2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
if sys.argv[1] == "tune":
    import metagrad
    metagrad.tune_process()
import torch, metagrad as mg
torch.manual_seed(0)
model = mg.build_model("omniglot-cnn", ways=5, strided=True)
params = dict(model.named_parameters())
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
maml = mg.MAML(inner_lr=0.4, inner_steps=1)
g = torch.Generator().manual_seed(0)
labels = torch.arange(5).repeat(32, 1)
times = []
for step in range(int(sys.argv[2]) + 1):
    images = torch.rand(2, 32, 5, 1, 28, 28, generator=g)
    episode = mg.Episode(images[0], labels, images[1], labels)
    start = time.perf_counter()
    out = mg.meta_batch_loss(maml, model, params, {}, episode)
    optimizer.zero_grad(); out.loss.backward(); optimizer.step()
    times.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "times": times[1:]}))
"""

NEIGHBOUR = "while True:\n    sum(range(10000))\n"

ARMS = {"script as is": ("plain", {}), "tune_process()": ("tune", {}),
        "OMP_NUM_THREADS=1": ("plain", {"OMP_NUM_THREADS": "1"})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300, help="seconds an arm may take")
    args = parser.parse_args(argv)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                              "OMP_NUM_THREADS", "METAGRAD_OMP_WAIT")}
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    try:
        for round_ in range(args.rounds):
            for arm in list(ARMS) if round_ % 2 == 0 else list(ARMS)[::-1]:
                mode, env = ARMS[arm]
                try:
                    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.steps)],
                                         env={**clean, **env}, capture_output=True, text=True, check=True,
                                         timeout=args.timeout)
                    times = json.loads(out.stdout.strip().splitlines()[-1])["times"]
                except subprocess.TimeoutExpired:
                    times = [float("inf")]
                results[arm] += times
                print(f"round {round_ + 1} {arm}: median {statistics.median(times):.3f} s, "
                      f"worst {max(times):.3f} s", file=sys.stderr, flush=True)
    finally:
        neighbour.kill()
        neighbour.wait()
    summary = {arm: {"median_s": statistics.median(t), "worst_s": max(t), "steps": len(t)}
               for arm, t in results.items()}
    for arm, s in summary.items():
        print(f"{arm:20s} median {s['median_s']:.3f} s/step, worst {s['worst_s']:.3f} s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
