"""Summary of `benchmarks/ab_live.py` trials over one or more of its JSON files (issue 19):
one Markdown row per trial, then the caught share of the slowdown trials and the false-alarm
share of the A/A trials, each with its exact 95 % Clopper-Pearson interval.

    .venv/bin/python benchmarks/ab_live_summary.py results/ab_live/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scipy.stats import beta


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial share k / n."""
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def share(label: str, k: int, n: int) -> str:
    if n == 0:
        return f"{label}: no trials"
    lo, hi = clopper_pearson(k, n)
    return f"{label}: {k}/{n} = {k / n:.0%} (95 % Clopper-Pearson [{lo:.1%}, {hi:.1%}])"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    rows: list[tuple[str, dict[str, Any]]] = []
    for f in args.files:
        data = json.loads(f.read_text())
        rows += [(f.name, r) for r in data["rows"]]
    print("| file | trial | kind | outcome | runs | minutes | start (UTC) | stopped by |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        kind = "5 % slowdown" if r["kind"] == "slow" else "A/A"
        print(
            f"| {name} | {r['trial']} | {kind} | {r['outcome']} | {r['runs']} | "
            f"{r['seconds'] / 60:.1f} | {r.get('start_utc', '(not recorded)')} | "
            f"{r.get('stopped_by', '')} |"
        )
    slow = [r for _, r in rows if r["kind"] == "slow"]
    aa = [r for _, r in rows if r["kind"] == "aa"]
    print(share("slowdown caught", sum(r["outcome"] == "regression" for r in slow), len(slow)))
    print(share("A/A false alarm", sum(r["outcome"] == "regression" for r in aa), len(aa)))
    for label, group in (("slowdown", slow), ("A/A", aa)):
        if group:
            outcomes = sorted({r["outcome"] for r in group})
            counts = {o: sum(r["outcome"] == o for r in group) for o in outcomes}
            runs = sorted(r["runs"] for r in group if r["runs"] is not None)
            minutes = max(r["seconds"] for r in group) / 60
            print(f"{label} outcomes {counts}; runs {runs}; longest {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
