"""(Over 400 lines: certified percentiles, validity rules and the load they judge are one verdict.)
Numbers a reader can trust: certified percentiles and validity verdicts (pure functions).

Certified percentiles follow MLPerf LoadGen's early-stopping criterion
(`loadgen/early_stopping.cc`): with ``h`` samples under a latency bound and ``t`` over it,
the p-th percentile is under the bound at 99 % confidence when the binomial tail
``I_p(h, t + 1) < 0.01`` (``I`` the regularized incomplete beta function: the probability
that ``h`` or more of ``h + t`` samples fall under the true p-th percentile). The smallest
sample counts that certify, as LoadGen states them:

===========  =========  ======  =======
overages     p90        p99     p99.9
===========  =========  ======  =======
none         44         459     4,603
one          64         662     6,636
===========  =========  ======  =======

Checked against LoadGen 6.0.17's own run (its single-stream test on a stand-in system with
latencies of 1..n ms, read from its summary): 63 queries are "not enough", 64 satisfy p90 early
stopping, and p99 "would need at least 662". LoadGen counts the query at its estimate as over
the bound, so its "would discard d highest" is `max_overages - 1` (n = 100: 2 vs 3; n = 300:
17 vs 18) and its estimate sits about one sample higher than `certify`'s bound, the
order-statistic bound ``X_(n - t)`` whose miss probability is exactly ``I_p(n - t, t + 1)``.

A median needs 7 samples. Below its minimum a percentile is reported as "not certifiable at
N = ..., needs M", never as a met bound.

Validity (a figure VALID or INVALID, with reasons and what to change) follows LoadGen's
`results.cc`: enough samples for the percentile reported, a minimum duration, an error rate
under a cap, no overload. The rules are here; the plugin decides where to apply them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import betainc

from servelab.stats import MIN_RUNS

if TYPE_CHECKING:
    from servelab.client import RequestRecord

#: LoadGen's confidence for early stopping.
CONFIDENCE = 0.99
#: No sample count certifies past this; a search that reaches it is a caller's error.
_MAX_SAMPLES = 10**9


def _fraction(p: float) -> float:
    """A percentile given in percent (90, 99, 99.9) as a fraction in (0, 1)."""
    if not 0 < p < 100:
        raise ValueError(f"percentile must be within (0, 100) percent, got {p}")
    return p / 100.0


def tail_probability(under: int, over: int, p: float) -> float:
    """``I_p(under, over + 1)``: the chance of seeing `under` or more of `under + over`
    samples below the true p-th percentile (p in percent). Certified when < 1 - CONFIDENCE."""
    if under < 1 or over < 0:
        return 1.0
    return float(betainc(under, over + 1, _fraction(p)))


def is_certified(under: int, over: int, p: float, confidence: float = CONFIDENCE) -> bool:
    """True when `under` samples at or under a bound and `over` above it certify that the
    p-th percentile is at or under that bound at `confidence`."""
    return tail_probability(under, over, p) < 1.0 - confidence


def min_samples(p: float, overages: int = 0, confidence: float = CONFIDENCE) -> int:
    """The fewest samples (under + over) that certify the p-th percentile with `overages`
    samples over the bound allowed.

    >>> min_samples(90), min_samples(99), min_samples(99, overages=1)
    (44, 459, 662)
    """
    if overages < 0:
        raise ValueError(f"overages must be >= 0, got {overages}")
    _fraction(p)
    lo, hi = 1, 1
    while not is_certified(hi, overages, p, confidence):  # the tail falls as `under` grows
        lo, hi = hi + 1, hi * 2
        if hi > _MAX_SAMPLES:
            raise ValueError(f"p{p} is not certifiable with {overages} overages")
    while lo < hi:
        mid = (lo + hi) // 2
        if is_certified(mid, overages, p, confidence):
            hi = mid
        else:
            lo = mid + 1
    return lo + overages


def max_overages(n: int, p: float, confidence: float = CONFIDENCE) -> int | None:
    """The most of `n` samples that may lie over the bound while still certifying the p-th
    percentile; None when `n` is too few even with none over."""
    if not is_certified(n, 0, p, confidence):
        return None
    lo, hi = 0, n - 1  # the largest t with is_certified(n - t, t)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if is_certified(n - mid, mid, p, confidence):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class CertifiedPercentile:
    """One percentile with its sample support.

    `value` is the plain percentile (linear, as `servelab.metrics` reports it); `bound` the
    early-stopping estimate: the smallest sample value that certifies the percentile is at
    or under it at `confidence` (None when `n` is too few); `needed` the fewest samples that
    would certify it with none over."""

    p: float
    value: float | None
    n: int
    certifiable: bool
    bound: float | None
    overages: int | None
    needed: int
    confidence: float = CONFIDENCE

    def describe(self) -> str:
        name = f"p{self.p:g}"
        if self.value is None:
            return f"{name}: no samples (needs {self.needed} to certify)"
        if not self.certifiable:
            return (
                f"{name} = {self.value:.6g}: not certifiable at N = {self.n}, needs "
                f"{self.needed} at {self.confidence * 100:g} % confidence"
            )
        return (
            f"{name} = {self.value:.6g} (N = {self.n}); certified at "
            f"{self.confidence * 100:g} % confidence to be <= {self.bound:.6g} "
            f"({self.overages} of {self.n} samples over)"
        )


def certify(
    values: Sequence[float], p: float, confidence: float = CONFIDENCE
) -> CertifiedPercentile:
    """The p-th percentile (in percent) of `values` (non-finite values dropped) with its
    sample count and LoadGen's early-stopping bound at `confidence`.

    >>> certify(list(range(1, 31)), 99).describe()
    'p99 = 29.71: not certifiable at N = 30, needs 459 at 99 % confidence'
    """
    needed = min_samples(p, 0, confidence)
    arr = np.sort(np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64))
    n = int(arr.size)
    if n == 0:
        return CertifiedPercentile(p, None, 0, False, None, None, needed, confidence)
    value = float(np.percentile(arr, p))
    t = max_overages(n, p, confidence)
    if t is None:
        return CertifiedPercentile(p, value, n, False, None, None, needed, confidence)
    # With the bound at the (n - t)-th smallest sample, n - t samples are at or under it.
    return CertifiedPercentile(p, value, n, True, float(arr[n - t - 1]), t, needed, confidence)


# --------------------------------------------------------------------------- validity


#: Which percentile a figure's name reports (its per-request statistic); others: the median.
_PERCENTILE_PREFIXES = (("p99.9_", 99.9), ("p999_", 99.9), ("p99_", 99.0), ("p90_", 90.0))


def reported_percentile(metric: str) -> float:
    """The per-request percentile a figure reports, from its catalogue name: `p99_ttft_ms`
    reports the 99th; `median_*`, rates and means are read at the median (50)."""
    for prefix, p in _PERCENTILE_PREFIXES:
        if metric.startswith(prefix) or f"_{prefix}" in metric:
            return p
    return 50.0


@dataclass(frozen=True)
class ValidityRules:
    """What a figure needs to be quoted (LoadGen's `results.cc` checks, per figure)."""

    min_duration_s: float = 0.0
    max_error_rate: float = 0.0
    max_outstanding: int | None = None  # overload: requests in flight past this cap
    max_schedule_delay_s: float | None = None  # open loop: p99 late start past this
    min_achieved_rate: float = 0.99  # open loop: achieved / offered rate at least this
    confidence: float = CONFIDENCE


@dataclass(frozen=True)
class Validity:
    """VALID or INVALID, with each reason and what to change."""

    valid: bool
    reasons: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return "VALID" if self.valid else "INVALID"

    def describe(self) -> str:
        if self.valid:
            return "VALID"
        parts = [f"{r} ({a})" if a else r for r, a in zip(self.reasons, self.advice, strict=True)]
        return "INVALID: " + "; ".join(parts)


def _load_reasons(
    metric: str,
    peak_outstanding: int | None,
    offered_rate: float | None,
    achieved_rate: float | None,
    p99_schedule_delay_s: float | None,
    rules: ValidityRules,
) -> tuple[list[str], list[str]]:
    """Overload, achieved against offered rate, and schedule delay: (reasons, advice)."""
    reasons: list[str] = []
    advice: list[str] = []
    cap = rules.max_outstanding
    if cap is not None and peak_outstanding is not None and peak_outstanding > cap:
        reasons.append(f"{metric}: overloaded: {peak_outstanding} requests in flight, cap {cap}")
        advice.append(
            "lower the offered rate or concurrency (or raise the cap, limits.max_outstanding, "
            "where a queue is what the test measures)"
        )
    if offered_rate and achieved_rate is not None:
        share = achieved_rate / offered_rate
        if share < rules.min_achieved_rate:
            reasons.append(
                f"{metric}: achieved {achieved_rate:.4g}/s of the offered {offered_rate:.4g}/s "
                f"({share * 100:.1f}%, minimum {rules.min_achieved_rate * 100:g}%)"
            )
            advice.append(
                "the client started requests behind its schedule: lower the rate, or send "
                "from more worker processes (Settings.workers)"
            )
    late = rules.max_schedule_delay_s
    if late is not None and p99_schedule_delay_s is not None and p99_schedule_delay_s > late:
        reasons.append(
            f"{metric}: the client started requests late (p99 {p99_schedule_delay_s * 1000:.3g} "
            f"ms, cap {late * 1000:g} ms)"
        )
        advice.append("the client cannot hold this rate on this machine: lower it")
    return reasons, advice


def figure_validity(
    metric: str,
    *,
    samples: int,
    failed: int = 0,
    duration_s: float | None = None,
    peak_outstanding: int | None = None,
    offered_rate: float | None = None,
    achieved_rate: float | None = None,
    p99_schedule_delay_s: float | None = None,
    rules: ValidityRules = ValidityRules(),
) -> Validity:
    """Judge whether a figure may be quoted: `samples` successful requests behind the
    percentile it reports (`reported_percentile(metric)`), `failed` requests, the measured
    `duration_s`, the peak of requests in flight, and for open-loop load the offered and
    achieved rates and the 99th percentile of the client's late starts."""
    reasons: list[str] = []
    advice: list[str] = []
    p = reported_percentile(metric)
    if p <= 50:
        # A median over runs is judged by the run-level statistics (stats.compare_runs),
        # which need MIN_RUNS fresh runs; a tail percentile is a claim about requests and must
        # be certifiable (LoadGen's early-stopping bound).
        if samples < MIN_RUNS:
            reasons.append(f"{metric}: N = {samples} run(s), a verdict needs at least {MIN_RUNS}")
            advice.append(f"measure at least {MIN_RUNS} runs (--runs)")
    elif samples < (need := min_samples(p, 0, rules.confidence)):
        reasons.append(
            f"{metric}: p{p:g} not certifiable at N = {samples} "
            f"({rules.confidence * 100:g} % confidence needs {need})"
        )
        advice.append(f"measure at least {need} requests (more runs or requests per run)")
    total = samples + failed
    rate = failed / total if total else 0.0
    if total and rate > rules.max_error_rate:
        reasons.append(
            f"{metric}: error rate {rate * 100:.1f}% ({failed} of {total}) over the cap "
            f"{rules.max_error_rate * 100:.1f}%"
        )
        advice.append("read the failed rows' errors in raw.jsonl; lower the load or fix the server")
    if duration_s is not None and duration_s < rules.min_duration_s:
        reasons.append(
            f"{metric}: measured {duration_s:.3g} s, under the minimum {rules.min_duration_s:g} s"
        )
        advice.append("measure longer (more output tokens, requests or runs)")
    more = _load_reasons(
        metric, peak_outstanding, offered_rate, achieved_rate, p99_schedule_delay_s, rules
    )
    reasons += more[0]
    advice += more[1]
    return Validity(not reasons, tuple(reasons), tuple(advice))


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Load:
    """How one run's load was delivered: the peak of requests in flight and, for open-loop
    load, the schedule's offered rate against the rate the client really started requests
    at, and how late it started them (LoadGen reports scheduled against achieved; a client
    that falls behind its schedule measures itself)."""

    requests: int
    peak_outstanding: int
    offered_rps: float | None = None  # open loop: (n - 1) / span of the schedule
    achieved_rps: float | None = None  # open loop: (n - 1) / span of the client's starts
    delay_s: tuple[float, float, float] | None = None  # schedule delay p50, p99, max

    def describe(self) -> str:
        out = f"{self.requests} requests, at most {self.peak_outstanding} in flight"
        if self.offered_rps is not None and self.achieved_rps is not None:
            out += f"; offered {self.offered_rps:.4g}/s, started {self.achieved_rps:.4g}/s"
        if self.delay_s is not None:
            p50, p99, top = (x * 1000 for x in self.delay_s)
            out += f"; schedule delay p50 {p50:.3g} / p99 {p99:.3g} / max {top:.3g} ms"
        return out


def peak_outstanding(spans: Sequence[tuple[int, int]]) -> int:
    """The most (start, end) intervals open at once (an end before a start at one instant)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: e)
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def _rate(times_s: Sequence[float]) -> float | None:
    span = max(times_s) - min(times_s) if len(times_s) > 1 else 0.0
    return (len(times_s) - 1) / span if span > 0 else None


def load_of(
    records: Sequence[RequestRecord],
    start_ns: int,
    end_ns: int,
    offsets_s: Sequence[float] | None = None,
) -> Load:
    """A run's `Load` from its records (a request is in flight from its send to its stream's
    end, or the run's end where it has none); `offsets_s`, the open-loop schedule (one offset
    per request index, from the run's start), adds offered and achieved rates and delays."""
    spans = [(r.send_ns, r.done_ns or r.end_ns or end_ns) for r in records]
    load = Load(len(records), peak_outstanding(spans))
    if offsets_s is None or len(offsets_s) != len(records) or not records:
        return load
    by_index = sorted(records, key=lambda r: r.index)
    starts = [(r.arrival_ns - start_ns) / 1e9 for r in by_index]
    delays = np.asarray([max(0.0, a - o) for a, o in zip(starts, offsets_s, strict=True)])
    return Load(
        load.requests,
        load.peak_outstanding,
        _rate(list(offsets_s)),
        _rate(starts),
        (
            float(np.percentile(delays, 50)),
            float(np.percentile(delays, 99)),
            float(delays.max()),
        ),
    )


def load_validity(metric: str, loads: Sequence[Load], rules: ValidityRules) -> Validity:
    """The load rules of `figure_validity` (overload, achieved rate, schedule delay) over a
    test's runs: the worst run of each decides."""
    if not loads:
        return Validity(True)
    shares = [x for x in loads if x.offered_rps and x.achieved_rps is not None]
    worst = min(
        shares, key=lambda x: (x.achieved_rps or 0.0) / (x.offered_rps or 1.0), default=None
    )
    delays = [x.delay_s[1] for x in loads if x.delay_s is not None]
    reasons, advice = _load_reasons(
        metric,
        max(x.peak_outstanding for x in loads),
        None if worst is None else worst.offered_rps,
        None if worst is None else worst.achieved_rps,
        max(delays, default=None),
        rules,
    )
    return Validity(not reasons, tuple(reasons), tuple(advice))


def support_note(
    samples: int, failed: int, duration_s: float | None, p: float, requests: int | None = None
) -> str:
    """The sample support a figure's notes carry: the values its reported percentile rests
    on (its runs' values), and the requests, failures and measured time behind the test."""
    behind = f"{requests} requests, " if requests is not None else ""
    took = f", {duration_s:.3g} s measured" if duration_s is not None else ""
    if p <= 50:
        what = f"N = {samples} runs (a median over runs is judged from {MIN_RUNS})"
    else:
        what = f"N = {samples} requests (p{p:g} certifiable at 99 % from {min_samples(p, 0)})"
    return f"support: {what}; {behind}{failed} failed{took}"


def invalid_note(notes: Sequence[str]) -> str | None:
    """The figure's INVALID note (`Validity.describe`), or None when it has none."""
    return next((n for n in notes if n.startswith("INVALID")), None)


def validity_notes(
    metric: str,
    values: Sequence[float],
    failed: int,
    duration_s: float | None,
    max_error_rate: float = 0.0,
    requests: int | None = None,
    loads: Sequence[Load] = (),
    load_rules: ValidityRules | None = None,
    run_requests: int | None = None,
) -> tuple[str, str]:
    """A measured figure's two notes: its validity (`Validity.describe`) judged on its finite
    run values (a figure's value is their median: they are its support), the failed
    requests and measured time behind it, and the load of its test's runs (`loads`, judged
    by `load_rules`: overload, achieved rate, schedule delay; the worst run decides); and its
    sample support, with the heaviest run's load. `run_requests`: the fewest successful
    requests of any one run behind the test (a tail percentile's support is at most that)."""
    p = reported_percentile(metric)
    n = sum(1 for v in values if math.isfinite(v))
    if p > 50 and requests is not None:
        # A tail percentile rests on the successful requests of one run (the figure is the
        # median of per-run percentiles); `requests` counts the whole test's, so share them
        # out over the runs: never more than the requests that were really behind one value.
        n = (requests - failed) // max(1, len(values))
        if run_requests is not None:
            # A test of several load levels (a rate sweep) shares its requests over levels
            # as well as runs: the smallest run's successful requests are what one value
            # rests on at most.
            n = min(n, run_requests)
    rules = load_rules or ValidityRules()
    rules = dataclasses.replace(rules, max_error_rate=max_error_rate)
    verdict = figure_validity(metric, samples=n, failed=failed, duration_s=duration_s, rules=rules)
    by_load = load_validity(metric, loads, rules)
    if not by_load.valid:
        verdict = Validity(
            False, verdict.reasons + by_load.reasons, verdict.advice + by_load.advice
        )
    support = support_note(n, failed, duration_s, p, requests)
    if loads:
        worst = max(loads, key=lambda x: x.peak_outstanding)
        support += f"; load: {worst.describe()}" + (
            f" (worst of {len(loads)} runs)" if len(loads) > 1 else ""
        )
    return verdict.describe(), support
