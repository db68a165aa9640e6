"""Live trials of the interleaved, sequential A/B verdict on the CPU default (issue 19).

Starts the profile's server once (servelab's pool; stopped at the end, also on Ctrl-C) and
runs ``--trials`` comparisons one after another, alternating a stand-in slowdown and an
A/A pair:

* ``slow``: B is A's server through the delaying proxy (`servelab.delay_proxy`),
  adding ``--slowdown`` (default 5 %) of A's TPOT, measured just before the trial, to every
  token; must be called a regression;
* ``A/A``: B is A's endpoint itself; must not be called a regression.

One run is one single-stream decode request (``--prompt-tokens`` / ``--output-tokens``), its
value the median TPOT; runs come in randomized ABBA blocks and the verdict is
`servelab.sequential`'s, on a budget of ``--max-runs`` (default the 10 %-noise design's,
292) and a deadline of ``--deadline`` seconds a trial. Per trial it prints the outcome, the
runs and seconds spent, the change and its repeated CI, the run noise seen (log-sd of A's
runs) and the host's load; a summary last. Run it when no other perf session is running:

    .venv/bin/python benchmarks/ab_live.py --trials 6 --json results/ab_live.json

About 1-10 minutes a trial on 2 cores (server start about a minute once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from servelab import ab, metrics, sequential, workloads
from servelab.delay_proxy import delayed
from servelab.pool import ServerPool
from servelab.profiles import default_profile_dirs, load_named
from servelab.server import Endpoint

ROOT = Path(__file__).resolve().parents[1]


def one_run(endpoint: Endpoint, args: argparse.Namespace, tag: str, again: bool = False) -> float:
    settings = workloads.Settings(
        nonce=f"ab-live-{tag}-{time.time_ns()}",
        progress=False,
        check_server_cache=False,
        timeout_s=120.0,
    )
    (res,) = workloads.decode(
        endpoint,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        runs=1,
        warmup_requests=0,
        settings=settings,
    )
    reasons = res.invalid_reasons()
    if reasons and not again:
        print(f"  run {tag} invalid ({'; '.join(reasons)}): measured again", flush=True)
        return one_run(endpoint, args, tag + "-again", again=True)
    if reasons:
        return float("nan")  # twice invalid: ab.run_ab stops with the side named
    tpot = metrics.compute(res.records, res.start_ns, res.end_ns).tpot_ms
    return float("nan") if tpot is None else float(tpot.median)


def trial(
    k: int, kind: str, a: Endpoint, args: argparse.Namespace, plan: sequential.Plan
) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    start_utc = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    calib = [one_run(a, args, f"{k}-cal{i}") for i in range(3)]
    calib = [x for x in calib if math.isfinite(x)]  # a twice-invalid run gives nan
    if not calib:
        raise ab.ABError(f"trial {k}: no valid calibration run of A (the host too loaded)")
    tpot = statistics.median(calib)
    rng = np.random.default_rng([args.seed, k])
    deadline = args.deadline
    if args.end_by is not None:
        deadline = max(1.0, min(deadline, args.end_by - time.time()))

    def run(b: Endpoint) -> ab.ABResult:
        return ab.run_ab(
            lambda i: one_run(a, args, f"{k}-A{i}"),
            lambda i: one_run(b, args, f"{k}-B{i}"),
            plan,
            "lower",
            rng,
            deadline_s=deadline,
        )

    delay_ms = 0.0
    if kind == "slow":
        delay_ms = args.slowdown * tpot
        with delayed(a, delay_ms / 1000) as b:
            one_run(b, args, f"{k}-Bwarm")
            res = run(b)
    else:
        res = run(a)
    v = res.verdict
    la = np.log(np.asarray(res.a))
    lb = np.log(np.asarray(res.b))
    diffs = sequential.log_ratios(res.a, res.b)
    noise_a = float(la.std(ddof=1))
    unit_sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
    load1 = os.getloadavg()[0]
    row: dict[str, Any] = {
        "trial": k,
        "kind": kind,
        "start_utc": start_utc,
        "outcome": v.outcome,
        "runs": v.runs,
        "seconds": round(res.seconds, 1),
        "stopped_by": res.stopped_by,
        "change": v.change,
        "ci": [v.ci_low, v.ci_high],
        "resolves": v.resolvable,
        "tpot_ms": tpot,
        "delay_ms": delay_ms,
        "noise_a": noise_a,
        "noise_b": float(lb.std(ddof=1)),
        "unit_sd": unit_sd,
        "load": [load0, load1],
        "text": res.describe(),
        "a": list(res.a),
        "b": list(res.b),
        "orders": list(res.orders),
    }
    ci = "" if v.ci_low is None else f" CI [{v.ci_low:+.1%}, {v.ci_high:+.1%}]"
    print(
        f"trial {k} {kind:<4} {v.outcome:<12} runs {v.runs:3d} {res.seconds:5.0f} s "
        f"change {(v.change or 0):+.1%}{ci} run noise A {noise_a:.1%} "
        f"unit sd {unit_sd:.1%} TPOT {tpot:.1f} ms delay {delay_ms:.2f} ms "
        f"load {load0:.1f}->{load1:.1f}",
        flush=True,
    )
    return row


def aborted(k: int, kind: str, started: float, why: str) -> dict[str, Any]:
    """The row of a trial that ended without a verdict."""
    when = datetime.datetime.fromtimestamp(started, datetime.UTC)
    return {
        "trial": k,
        "kind": kind,
        "start_utc": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "outcome": "aborted",
        "runs": None,
        "seconds": round(time.time() - started, 1),
        "stopped_by": "aborted",
        "change": None,
        "ci": [None, None],
        "noise_a": math.nan,
        "text": why,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--first", choices=("slow", "aa"), default="slow")
    ap.add_argument("--slowdown", type=float, default=0.05)
    ap.add_argument("--profile", default="cpu-smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=24)
    ap.add_argument("--max-runs", type=int, default=sequential.units_needed(0.10) * 4)
    ap.add_argument("--deadline", type=float, default=570.0)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--stop-by", type=float, default=None, help="no new trial after this epoch")
    ap.add_argument("--end-by", type=float, default=None, help="every trial ends by this epoch")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--endpoint", default=None, help="a running server instead (a check)")
    args = ap.parse_args()
    (profile,) = load_named([args.profile], default_profile_dirs(ROOT))
    plan = sequential.plan(sequential.Design(max_units=args.max_runs // 4))
    pool = ServerPool(ROOT / "results" / "ab_live" / "logs")
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        a = (
            pool.get(profile).endpoint
            if args.endpoint is None
            else Endpoint(base_url=args.endpoint, model=profile.model.served_name, managed=False)
        )
        print(f"server up in {time.time() - t0:.0f} s: {a.base_url}", flush=True)
        one_run(a, args, "warmup")
        kinds = ("slow", "aa") if args.first == "slow" else ("aa", "slow")
        for k in range(args.trials):
            if args.stop_by is not None and time.time() > args.stop_by:
                print("stop-by time reached: no new trial", flush=True)
                break
            started = time.time()
            try:
                rows.append(trial(k, kinds[k % 2], a, args, plan))
            except ab.ABError as exc:  # a twice-invalid run (the host too loaded): kept, go on
                print(f"trial {k} {kinds[k % 2]} aborted: {exc}", flush=True)
                rows.append(aborted(k, kinds[k % 2], started, str(exc)))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                info = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                args.json.write_text(json.dumps({"args": info, "rows": rows}, indent=1))
    finally:
        pool.close()
    print(
        f"\n{args.profile}, p{args.prompt_tokens}/o{args.output_tokens}, budget {args.max_runs} "
        f"runs, deadline {args.deadline:.0f} s, slowdown {args.slowdown:.0%}"
    )
    print("| trial | pair | outcome | runs | time (s) | change [repeated 99 % CI] | A run noise |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lo, hi = r["ci"]
        ci = "" if lo is None else f" [{lo:+.1%}, {hi:+.1%}]"
        pair = f"+{args.slowdown:.0%} TPOT" if r["kind"] == "slow" else "A/A"
        print(
            f"| {r['trial']} | {pair} | {r['outcome']} | {r['runs']} | {r['seconds']:.0f} | "
            f"{(r['change'] or 0):+.1%}{ci} | {r['noise_a']:.1%} |"
        )
    for kind in ("slow", "aa"):
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            reg = sum(r["outcome"] == "regression" for r in mine)
            print(
                f"{kind}: {reg}/{len(mine)} called a regression; runs "
                f"{[r['runs'] for r in mine]}; seconds {[r['seconds'] for r in mine]}"
            )
    return 0 if all(math.isfinite(r["seconds"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
