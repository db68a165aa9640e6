"""A/A sessions: how often unchanged code is called a regression, live, session after session.

Runs ``--sessions`` separate pytest sessions of the decode and prefill perf tests against the
embedded CPU default (each session starts its own server, runs the quality gate, measures
``--runs`` runs per figure) and judges every figure of every session against one stored
baseline with three rules (servelab.stats):

* ``plain``: today's Welch test on log values (``session_cv = 0``);
* ``drift``: the same with the between-session drift prior (``--session-cv``, default
  ``stats.CPU_SESSION_CV``) as a fixed variance component;
* ``pooled``: the prior pooled with the drift seen in the *other* A/A sessions
  (``stats.session_drift``, as a baseline's history would give it).

Nothing changes between sessions, so every regression is a false alarm (and every
improvement a false verdict). It prints each session's load average (another job on the
host moves a whole session); per rule, false alarms per figure and per session (a session
fails if any figure regresses), against the stored baseline and over every ordered pair of
sessions (more comparisons, but correlated: one session is the baseline of many); and the
measured spread of session means per metric: the number behind ``CPU_SESSION_CV``
(docs/verdicts.md).

The stored baseline is ``<baselines-dir>/*/cpu-smollm2.json`` (``--baselines-dir``, default
``baselines``); it is copied into the work folder and never written. Without one (or with
``--new-baseline``) the first session runs with ``--update-baselines`` into the copy and
becomes the baseline. Run it when the machine is otherwise quiet, or say how it was loaded:

    .venv/bin/python benchmarks/aa_sessions.py --sessions 20 --runs 3 --json results/aa.json

About 2-3 minutes a session on 2 cores (server start, quality gate, 3 decode runs of 64
tokens, 3 prefill requests at 32/64/128 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from servelab.stats import (
    CPU_SESSION_CV,
    SESSION_PRIOR_DF,
    compare_runs,
    session_drift,
)

PROFILE = "cpu-smollm2"
TESTS = ("perf/test_decode.py", "perf/test_prefill.py")
RULES = ("plain", "drift", "pooled")


@dataclass(frozen=True)
class Session:
    index: int
    exit_code: int
    seconds: float
    load: tuple[float, float]  # 1-minute load average at the session's start and end
    figures: dict[str, tuple[str, tuple[float, ...]]]  # key -> (direction, runs)
    verdicts: dict[str, str]  # key -> the session's own verdict status (its judge)


def run_session(
    i: int, work: Path, baselines: Path, runs: int, update: bool, tests: Sequence[str]
) -> Session:
    results = work / f"session-{i:02d}"
    cmd = [
        sys.executable, "-m", "pytest", *tests, "-m", "perf", "-q", "-p", "no:cacheprovider",
        "--profile", PROFILE, "--runs", str(runs),
        "--results-dir", str(results), "--baselines-dir", str(baselines),
    ]  # fmt: skip
    if update:
        cmd.append("--update-baselines")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with (results.with_suffix(".log")).open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - t0
    return read_session(i, results, rc, seconds, (load0, os.getloadavg()[0]))


def read_session(
    i: int, results: Path, rc: int, seconds: float, load: tuple[float, float]
) -> Session:
    figures: dict[str, tuple[str, tuple[float, ...]]] = {}
    verdicts: dict[str, str] = {}
    for record in sorted(results.glob("records/*/record.json")):
        data = json.loads(record.read_text(encoding="utf-8"))
        for res in data.get("results", []):
            for f in res.get("figures", []):
                figures[f["key"]] = (f["direction"], tuple(float(x) for x in f["runs"]))
                verdicts[f["key"]] = (f.get("verdict") or {}).get("status", "not judged")
    return Session(i, rc, seconds, load, figures, verdicts)


def load_baseline(baselines: Path) -> tuple[Path, dict[str, Any]] | None:
    found = sorted(baselines.glob(f"*/{PROFILE}.json"))
    if not found:
        return None
    return found[0], json.loads(found[0].read_text(encoding="utf-8"))


def judge(
    rule: str,
    base: Sequence[float],
    cand: Sequence[float],
    direction: Any,
    threshold: float,
    prior: float,
    history: Sequence[Sequence[float]],
) -> str:
    if rule == "plain":
        return compare_runs(base, cand, direction, threshold=threshold).outcome
    if rule == "drift":
        return compare_runs(base, cand, direction, threshold=threshold, session_cv=prior).outcome
    d = session_drift(history, prior_cv=prior, prior_df=SESSION_PRIOR_DF)
    return compare_runs(
        base, cand, direction, threshold=threshold, session_cv=d.cv, session_df=d.df
    ).outcome


def rates(
    pairs: list[tuple[int, int]],
    runs_of: dict[int, dict[str, tuple[str, tuple[float, ...]]]],
    thresholds: dict[str, float],
    prior: float,
) -> dict[str, dict[str, Any]]:
    """False alarms per figure and per session for each rule over (baseline, candidate)."""
    out: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        figs = alarms = better = sessions = failed = 0
        by_key: dict[str, int] = {}
        for b, c in pairs:
            hit = False
            for key, (direction, cand) in runs_of[c].items():
                if key not in runs_of[b]:
                    continue
                base = runs_of[b][key][1]
                history = [s[key][1] for j, s in runs_of.items() if j not in (b, c) and key in s]
                outcome = judge(
                    rule, base, cand, direction, thresholds.get(key, 0.05), prior, history
                )
                figs += 1
                better += outcome == "improvement"
                if outcome == "regression":
                    alarms += 1
                    hit = True
                    by_key[key] = by_key.get(key, 0) + 1
            sessions += 1
            failed += hit
        out[rule] = {
            "figures": figs,
            "figure_false_alarms": alarms,
            "figure_rate": alarms / figs if figs else math.nan,
            "figure_false_improvements": better,
            "sessions": sessions,
            "session_false_alarms": failed,
            "session_rate": failed / sessions if sessions else math.nan,
            "by_metric": by_key,
        }
    return out


def spread(sessions: list[dict[str, tuple[str, tuple[float, ...]]]]) -> dict[str, dict[str, float]]:
    """Per metric: sd of session means and within-session run sd, on the log scale."""
    out: dict[str, dict[str, float]] = {}
    keys = sorted({k for s in sessions for k in s})
    for key in keys:
        runs = [s[key][1] for s in sessions if key in s and len(s[key][1]) >= 2]
        if len(runs) < 2:
            continue
        logs = [np.log(np.asarray(r)) for r in runs]
        means = np.array([x.mean() for x in logs])
        within = float(np.sqrt(np.mean([x.var(ddof=1) for x in logs])))
        drift = session_drift(runs, prior_cv=0.0, prior_df=1e-12).cv  # history alone
        out[key] = {
            "sessions": len(runs),
            "sd_of_session_means": float(means.std(ddof=1)),
            "within_session_sd": within,
            "between_session_sd": drift,
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sessions", type=int, default=20, help="A/A sessions to run (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="--runs per session (default 3)")
    ap.add_argument("--baselines-dir", type=Path, default=Path("baselines"))
    ap.add_argument("--new-baseline", action="store_true", help="ignore the stored baseline")
    ap.add_argument("--session-cv", type=float, default=CPU_SESSION_CV, help="drift prior")
    ap.add_argument(
        "--work", type=Path, default=None, help="work folder (default results/aa-<time>)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--tests", nargs="+", default=list(TESTS))
    ap.add_argument(
        "--reanalyze",
        action="store_true",
        help="run nothing: judge the sessions already in --work again (e.g. another prior)",
    )
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.runs < 3:
        ap.error("need --sessions >= 1 and --runs >= 3 (a verdict needs 3 runs a side)")

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work: Path = args.work or Path("results") / f"aa-{stamp}"
    baselines = work / "baselines"
    work.mkdir(parents=True, exist_ok=True)
    stored = None if args.new_baseline else load_baseline(args.baselines_dir)
    if args.reanalyze:
        if args.work is None or load_baseline(baselines) is None:
            ap.error("--reanalyze needs --work with the baselines/ of an earlier run")
    elif stored is not None:
        shutil.copytree(args.baselines_dir, baselines, dirs_exist_ok=True)
        print(f"baseline: {stored[0]} (copied to {baselines})", flush=True)
    else:
        print(f"baseline: none stored; session 0 records one into {baselines}", flush=True)
        s0 = run_session(0, work, baselines, args.runs, True, args.tests)
        print(
            f"session 0 (baseline): exit {s0.exit_code}, {s0.seconds:.0f} s, load average "
            f"{s0.load[0]:.1f} -> {s0.load[1]:.1f}",
            flush=True,
        )
        if load_baseline(baselines) is None:
            print(f"no baseline was written; see {work}/session-00.log", file=sys.stderr)
            return 2
    path, data = load_baseline(baselines) or (Path(), {})
    base_runs = {
        k: (m["direction"], tuple(float(x) for x in m["runs"])) for k, m in data["metrics"].items()
    }
    thresholds = {k: float(m["threshold"]) for k, m in data["metrics"].items()}

    sessions: list[Session] = []
    for i in range(1, args.sessions + 1):
        if args.reanalyze:
            nan = math.nan
            s = read_session(i, work / f"session-{i:02d}", -1, nan, (nan, nan))
        else:
            s = run_session(i, work, baselines, args.runs, False, args.tests)
        sessions.append(s)
        mine = {k: v for k, v in s.verdicts.items() if k in base_runs}
        bad = sorted(k for k, v in mine.items() if v == "regression")
        print(
            f"session {i}: exit {s.exit_code}, {s.seconds:.0f} s, load average "
            f"{s.load[0]:.1f} -> {s.load[1]:.1f}, {len(s.figures)} figures; "
            f"its own verdicts: regressions {bad or 'none'}",
            flush=True,
        )

    runs_of = {0: base_runs} | {s.index: s.figures for s in sessions}
    ids = [s.index for s in sessions if s.figures]
    vs_stored = rates([(0, i) for i in ids], runs_of, thresholds, args.session_cv)
    every = [0, *ids]  # the stored baseline is one more session
    all_pairs = rates(
        [(b, c) for b in every for c in every if b != c], runs_of, thresholds, args.session_cv
    )
    measured = spread([base_runs] + [s.figures for s in sessions if s.figures])
    summary = {
        "when": stamp,
        "baseline": str(path),
        "sessions": args.sessions,
        "runs": args.runs,
        "session_cv_prior": args.session_cv,
        "session_prior_df": SESSION_PRIOR_DF,
        "exit_codes": [s.exit_code for s in sessions],
        "load_averages": [s.load for s in sessions],
        "own_verdict_regressions": sum(
            v == "regression" for s in sessions for v in s.verdicts.values()
        ),
        "vs_stored_baseline": vs_stored,
        "all_session_pairs": all_pairs,
        "spread": measured,
        "work": str(work),
    }
    print(f"\nA/A false alarms, {len(ids)} sessions x {args.runs} runs, prior {args.session_cv}:")
    for name, table in (("vs stored baseline", vs_stored), ("all session pairs", all_pairs)):
        for rule, r in table.items():
            print(
                f"  {name:19s} {rule:6s}: figures {r['figure_false_alarms']}/{r['figures']} "
                f"({r['figure_rate']:.2%}), sessions {r['session_false_alarms']}/{r['sessions']} "
                f"({r['session_rate']:.2%}); false improvements {r['figure_false_improvements']} "
                f"{r['by_metric'] or ''}"
            )
    print("\nspread per metric (log scale; between = sd of session means less run noise):")
    for key, m in measured.items():
        print(
            f"  {key:40s} sessions {m['sessions']:2.0f}  between {m['between_session_sd']:.3f}  "
            f"session means {m['sd_of_session_means']:.3f}  within {m['within_session_sd']:.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
