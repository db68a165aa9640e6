"""Load sweeps and their knee: rates to offer, one point per load level, when the server has
saturated, and percentiles with the sample count that backs them (pure logic, no I/O).

A sweep offers rising load (open-loop request rates, or closed-loop concurrency) and reads
one `Point` per level from its run's records (`servelab.metrics.compute`). The server is
*saturated* at a level when, compared with the level before it, it failed requests, fell
behind an open-loop schedule (its completions spread over more than 1 / `min_pace` times
the span of the arrivals: requests queue), or its throughput stopped
rising with the load (gain < `min_gain_share` of the load's own gain) while its median
latency climbed (by more than `latency_rise`). The *knee* is the last level before the
first saturated one: the most load the server still turns into throughput. A sweep that
never saturates reports its top level as a lower bound; one saturated at its first level
has no knee. `sweep_until_saturated` measures level by level and stops there, so the levels
past the knee cost no time.

Percentiles follow `servelab.certify`: each carries the sample count behind it, and one the
sample cannot support says "not certifiable at N = ..." instead of passing as certified.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from servelab import metrics
from servelab.certify import CertifiedPercentile, certify, min_samples
from servelab.errors import ConfigError
from servelab.loadgen import RunResult

#: Percentiles a sweep reports as figures; p99.9 only where the sample certifies it.
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
EXTRA_PERCENTILE = 99.9
#: Per-request latencies reported as percentile figures (metrics' per-request values).
LATENCIES: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")


# --------------------------------------------------------------------------- rates


def geometric_rates(start_rps: float, factor: float, steps: int) -> tuple[float, ...]:
    """``steps`` rates from ``start_rps``, each ``factor`` times the one before.

    >>> geometric_rates(0.5, 2.0, 4)
    (0.5, 1.0, 2.0, 4.0)
    """
    if not start_rps > 0 or not factor > 1 or steps < 1:
        raise ConfigError(
            f"rate ramp: needs start_rps > 0, factor > 1 and steps >= 1 (got {start_rps}, "
            f"{factor}, {steps}); set workloads.rate_sweep.start_rps, factor and steps"
        )
    return tuple(start_rps * factor**i for i in range(steps))


def check_rates(rates: Sequence[float]) -> tuple[float, ...]:
    """Rates as given, refused unless finite, positive and strictly rising."""
    out = tuple(float(r) for r in rates)
    if not out or any(not (math.isfinite(r) and r > 0) for r in out):
        raise ConfigError(f"rate sweep: rates must be finite and > 0 requests/s (got {list(out)})")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ConfigError(f"rate sweep: rates must rise strictly (got {list(out)})")
    return out


def milli(rate_rps: float) -> int:
    """A rate in whole milli-requests per second, the axis a figure's name carries
    (0.5 req/s -> 500: `achieved_rps_r500`)."""
    return round(rate_rps * 1000)


def arrival_label(burstiness: float, seed: int | None) -> str:
    """The arrival process in words, for a figure's notes."""
    if math.isinf(burstiness):
        kind = "constant spacing (gamma burstiness inf)"
    elif burstiness == 1.0:
        kind = "Poisson (gamma burstiness 1)"
    else:
        kind = f"gamma, burstiness {burstiness:g}"
    return f"arrivals: {kind}, seed {seed}"


# --------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """One load level's outcome."""

    load: float  # offered rate (req/s) or concurrency
    requests: int
    completed: int
    failed: int
    achieved_rps: float  # completed / run duration
    output_tok_s: float
    goodput_rps: float | None  # None without SLOs
    median_latency_ms: float | None  # median E2EL: the latency the knee watches
    offered_rps: float | None = None  # open loop only
    # Open loop: span of the arrivals / span of the completions (1: completions kept pace
    # with arrivals; < 1: they spread out, requests queued). Unlike achieved / offered rate it
    # does not count the last request's own latency, which dominates a run of few requests.
    pace: float | None = None


def point(
    load: float,
    run: RunResult,
    *,
    open_loop: bool = True,
    slos_ms: dict[str, float] | None = None,
) -> Point:
    """The point of one run at `load` (its offered rate when `open_loop`)."""
    m = metrics.compute(run.records, run.start_ns, run.end_ns, slos_ms=slos_ms)
    return Point(
        load=load,
        requests=len(run.records),
        completed=m.completed,
        failed=m.failed,
        achieved_rps=_finite(m.request_throughput),
        output_tok_s=_finite(m.output_throughput),
        goodput_rps=m.request_goodput,
        median_latency_ms=m.e2el_ms.median if m.e2el_ms else None,
        offered_rps=load if open_loop else None,
        pace=_pace(run) if open_loop else None,
    )


def _pace(run: RunResult) -> float | None:
    arrivals = [r.arrival_ns for r in run.records]
    ends = [r.end_ns for r in run.records if r.success and r.end_ns is not None]
    if len(ends) < 2 or len(ends) < len(arrivals):
        return None
    came, done = max(arrivals) - min(arrivals), max(ends) - min(ends)
    return came / done if came > 0 and done > 0 else None


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


# --------------------------------------------------------------------------- saturation


@dataclass(frozen=True)
class SaturationRule:
    """When a level counts as saturated (see the module's doc)."""

    min_gain_share: float = 0.5  # throughput gain under this share of the load's gain ...
    latency_rise: float = 1.5  # ... while median latency rose more than this factor
    min_pace: float = 0.8  # open loop: arrival span / completion span under this
    max_failed: int = 0  # failed requests past this

    def why(self, prev: Point | None, cur: Point) -> str | None:
        """Why `cur` is saturated (None: it is not), given the level before it."""
        if cur.failed > self.max_failed:
            return f"{cur.failed} of {cur.requests} requests failed at load {cur.load:g}"
        if cur.pace is not None and cur.pace < self.min_pace:
            return (
                f"completions spread over {1 / cur.pace:.3g}x the arrivals' span at "
                f"{cur.load:g} (pace {cur.pace:.2f} < {self.min_pace:g}): requests queue"
            )
        if prev is None or prev.load <= 0 or prev.output_tok_s <= 0:
            return None
        load_gain = cur.load / prev.load - 1
        tput_gain = cur.output_tok_s / prev.output_tok_s - 1
        lat_a, lat_b = prev.median_latency_ms, cur.median_latency_ms
        climbed = lat_a is not None and lat_b is not None and lat_b > self.latency_rise * lat_a
        if tput_gain < self.min_gain_share * load_gain and climbed:
            return (
                f"throughput rose {tput_gain * 100:.0f} % for {load_gain * 100:.0f} % more load "
                f"(load {prev.load:g} -> {cur.load:g}) while median E2EL rose "
                f"{lat_a:.4g} -> {lat_b:.4g} ms"
            )
        return None


@dataclass(frozen=True)
class Knee:
    """The knee of one sweep: `load` is None when the first level already saturated;
    `bounded` is False when no level saturated (the knee is at or above `load`)."""

    load: float | None
    bounded: bool
    reason: str
    levels: tuple[float, ...]  # the loads measured, in order

    def describe(self, unit: str) -> str:
        measured = ", ".join(f"{x:g}" for x in self.levels)
        if self.load is None:
            return f"no knee: saturated at the first level ({self.reason}); levels {measured}"
        if not self.bounded:
            return (
                f"knee at or above {self.load:g} {unit}: no level saturated "
                f"(levels {measured} {unit}); extend the sweep for the knee itself"
            )
        return f"knee at {self.load:g} {unit}; the next level saturated: {self.reason}"


def knee(points: Sequence[Point], rule: SaturationRule = SaturationRule()) -> Knee:
    """The knee of points in order of rising load."""
    if not points:
        raise ConfigError("knee: no points measured")
    levels = tuple(p.load for p in points)
    prev: Point | None = None
    for i, cur in enumerate(points):
        why = rule.why(prev, cur)
        if why is not None:
            return Knee(points[i - 1].load if i else None, True, why, levels)
        prev = cur
    return Knee(points[-1].load, False, "no level saturated", levels)


def sweep_until_saturated(
    loads: Sequence[float],
    measure: Callable[[float], Point],
    rule: SaturationRule = SaturationRule(),
) -> tuple[list[Point], Knee]:
    """Measure each load in turn, stopping after the first saturated level."""
    points: list[Point] = []
    for load in loads:
        points.append(measure(load))
        if rule.why(points[-2] if len(points) > 1 else None, points[-1]) is not None:
            break
    return points, knee(points, rule)


# --------------------------------------------------------------------------- percentiles


def latency_values_ms(run: RunResult, latency: str) -> list[float]:
    """One run's per-request values of `latency` (ttft, tpot, itl, e2el) in ms; ITL pools
    every gap of every successful request, as vLLM does."""
    ok = [r for r in run.records if r.success]
    if latency == "itl":
        return [g * 1000 for r in ok for g in metrics.itls_s(r)]
    read = {"ttft": metrics.ttft_s, "tpot": metrics.tpot_s, "e2el": metrics.e2el_s}.get(latency)
    if read is None:
        raise ConfigError(f"percentiles: unknown latency {latency!r}; one of {list(LATENCIES)}")
    return [v * 1000 for r in ok if (v := read(r)) is not None]


def percentile_axis(p: float) -> int:
    """A percentile as a figure name carries it: 50 -> 50, 99.9 -> 999."""
    return int(p) if p == int(p) else int(str(p).replace(".", ""))


def percentiles_to_report(samples: int) -> tuple[float, ...]:
    """p50, p90, p99 always (labeled where not certifiable); p99.9 only where `samples`
    certify it."""
    extra = (EXTRA_PERCENTILE,) if samples >= min_samples(EXTRA_PERCENTILE) else ()
    return (*PERCENTILES, *extra)


@dataclass(frozen=True)
class PercentileRuns:
    """One percentile of one latency over several runs: a value per run, each certified
    against its own sample, and the pooled sample's certification."""

    latency: str
    p: float
    per_run: tuple[CertifiedPercentile, ...]
    pooled: CertifiedPercentile

    @property
    def values(self) -> tuple[float | None, ...]:
        return tuple(c.value for c in self.per_run)

    def notes(self) -> tuple[str, ...]:
        """The sample counts behind the figure, and whether they certify it."""
        counts = sorted({c.n for c in self.per_run})
        ns = ", ".join(str(n) for n in counts)
        per = self.per_run
        if per and all(c.certifiable for c in per):
            run_note = f"p{self.p:g} {self.latency} per run: N = {ns} samples, certified"
        else:
            need = per[0].needed if per else min_samples(self.p)
            run_note = (
                f"p{self.p:g} {self.latency} per run: not certifiable at N = {ns} "
                f"(needs {need} at {self.pooled.confidence * 100:g} % confidence); "
                "a value, not a certified bound"
            )
        return (run_note, f"pooled over {len(per)} runs, in ms: {self.pooled.describe()}")


def percentile_runs(runs: Sequence[RunResult], latency: str, p: float) -> PercentileRuns:
    """`p` (percent) of `latency` for each run and pooled over the runs."""
    per = [latency_values_ms(r, latency) for r in runs]
    return PercentileRuns(
        latency,
        p,
        tuple(certify(v, p) for v in per),
        certify([x for v in per for x in v], p),
    )


def sweep_rates(
    rates: Sequence[float], start_rps: float = 0.0, factor: float = 2.0, steps: int = 0
) -> tuple[float, ...]:
    """A rate sweep's levels: `rates` when given, else the geometric ramp."""
    if rates:
        return check_rates(rates)
    return geometric_rates(start_rps, factor, steps)


def slos_ms(ttft_ms: float | None, tpot_ms: float | None) -> dict[str, float]:
    """Goodput SLOs as `servelab.metrics.compute` takes them (only those set)."""
    return {k: v for k, v in (("ttft", ttft_ms), ("tpot", tpot_ms)) if v is not None}


def slo_label(slos: dict[str, float]) -> str:
    if not slos:
        return "no SLOs set: goodput not measured"
    return "goodput SLOs: " + ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in slos.items())
