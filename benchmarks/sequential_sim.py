"""Simulation of the sequential A/B verdict (servelab.sequential), the table in
docs/verdicts.md §1 ("Sequential A/B in one session").

Per run-noise level (log-scale sd per run, about its CV), at the unit budget
`sequential.units_needed` gives (an ABBA unit is 4 runs), it prints how the verdict ends on
A/A pairs (no true change) and on true 5 % and 10 % worsenings in both directions (latency
rises, throughput drops), the runs spent (mean and 90th percentile, both sides together), and
an A/A cell with a shared random-walk drift of 1 % per run. Every look of the design is
taken, so the false-alarm rate is the one under repeated looks.

    .venv/bin/python benchmarks/sequential_sim.py --trials 20000 [--json results/seq.json]

About 20 s at 20,000 trials a cell on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from servelab import sequential as sq
from servelab.figures import Direction

NOISES = (0.02, 0.03, 0.05, 0.10, 0.15)
#: (label, true change of B vs A, direction, shared drift per run)
CELLS: tuple[tuple[str, float, Direction, float], ...] = (
    ("A/A", 0.0, "lower", 0.0),
    ("A/A, drift 1 %/run", 0.0, "lower", 0.01),
    ("+5 % latency", 0.05, "lower", 0.0),
    ("-5 % throughput", -0.05, "higher", 0.0),
    ("+10 % latency", 0.10, "lower", 0.0),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--noise", type=float, nargs="*", default=list(NOISES))
    ap.add_argument("--json", type=Path, default=None, help="write every cell here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for i, noise in enumerate(args.noise):
        units = sq.units_needed(noise)
        p = sq.plan(sq.Design(max_units=units))
        for j, (label, change, direction, drift) in enumerate(CELLS):
            rng = np.random.default_rng([args.seed, i, j])
            res = sq.simulate(
                p, rng, noise=noise, true_change=change, trials=args.trials,
                direction=direction, drift=drift,
            )  # fmt: skip
            rows.append({"cell": label, "budget_runs": units * sq.RUNS_PER_UNIT, **res.__dict__})
    head = (
        f"{'noise':>6} {'budget':>7} {'cell':<20} {'regr':>7} {'impr':>7} {'no chg':>7} "
        f"{'inconc':>7} {'runs':>6} {'p90':>5}"
    )
    print(
        f"sequential A/B simulation: {args.trials} trials a cell, seed {args.seed}, "
        f"threshold 5 %, alpha 0.005 per direction, O'Brien-Fleming spending, ABBA units"
    )
    print(head)
    for r in rows:
        print(
            f"{r['noise'] * 100:5.0f}% {r['budget_runs']:7d} {r['cell']:<20} "
            f"{r['regression'] * 100:6.2f}% {r['improvement'] * 100:6.2f}% "
            f"{r['no_change'] * 100:6.1f}% {r['inconclusive'] * 100:6.1f}% "
            f"{r['mean_runs']:6.0f} {r['p90_runs']:5.0f}"
        )
    fixed = {
        n: math.ceil(((2.5758 + 1.2816) * n / math.log(1.05)) ** 2) * sq.RUNS_PER_UNIT
        for n in args.noise
    }
    print("fixed-run paired design, same targets (normal approximation, runs): " + str(fixed))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"trials": args.trials, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
