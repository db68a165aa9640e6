"""Open-loop rate sweep (issue 17 items 1, 2, 4): at each offered rate, the profile's count of
requests due at seeded gamma (Poisson at burstiness 1) arrival times, no concurrency cap.

Per rate: the achieved request rate, output throughput, goodput (where the profile sets SLOs)
and p50/p90/p99 of TTFT, TPOT, ITL and E2EL (p99.9 where the sample certifies it), each with
the sample count behind it. A sweep stops after the first rate at which the server saturated
(`servelab.sweeps`), and the knee, the last rate before it, is a figure of its own
(`knee_rate_rps`), so "the knee moved" is a verdict.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from servelab import arrivals, sweeps, workloads
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import RateSweepShape

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = RateSweepShape(
    prompt_tokens=32, output_tokens=8, requests_per_rate=6, rates=(2.0, 4.0, 8.0)
)


def test_rate_sweep(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("rate_sweep", EXTERNAL_SHAPE)
    rates = sweeps.sweep_rates(shape.rates, shape.start_rps, shape.factor, shape.steps)
    runs = m.runs(shape.runs)
    slos = sweeps.slos_ms(shape.slo_ttft_ms, shape.slo_tpot_ms)
    n = shape.requests_per_rate
    rule = sweeps.SaturationRule(
        min_gain_share=shape.knee_gain_share, latency_rise=shape.knee_latency_rise
    )

    def at(rate: float, first: bool) -> RunResult:
        plan = arrivals.schedule(n, rate, burstiness=shape.burstiness, seed=shape.seed)
        return workloads.open_loop(
            m.endpoint,
            schedule=plan,
            prompt_tokens=shape.prompt_tokens,
            output_tokens=shape.output_tokens,
            warmup_requests=1 if first else 0,
            settings=m.settings,
        )

    measured: list[tuple[dict[str, Any], RunResult]] = []
    for i in range(runs):
        m.progress(f"sweep {i + 1}/{runs} over {', '.join(f'{r:g}' for r in rates)} req/s")

        def measure(rate: float, i: int = i) -> sweeps.Point:
            res = at(rate, first=i == 0 and not measured)
            measured.append(({"run": i, "rate_rps": rate}, res))
            return sweeps.point(rate, res, slos_ms=slos)

        if shape.stop_at_knee:
            sweeps.sweep_until_saturated(rates, measure, rule)
        else:
            for r in rates:
                measure(r)

    kept = m.keep(measured, may_drop=True)
    by_rate: dict[float, list[RunResult]] = {}
    by_run: dict[int, list[tuple[float, RunResult]]] = {}
    for labels, res in kept:
        by_rate.setdefault(labels["rate_rps"], []).append(res)
        by_run.setdefault(labels["run"], []).append((labels["rate_rps"], res))

    common = (
        sweeps.arrival_label(shape.burstiness, shape.seed),
        f"open loop, no concurrency cap; {n} requests per rate and run, {runs} sweeps",
        f"rates {', '.join(f'{r:g}' for r in rates)} req/s"
        + ("; a sweep stops after its first saturated rate" if shape.stop_at_knee else ""),
        f"saturated: failed requests, pace < {rule.min_pace:g}, or throughput gain < "
        f"{rule.min_gain_share:g} x the rate's gain while median E2EL rose > "
        f"{rule.latency_rise:g}x",
    )
    fig_shape = Shape(shape.prompt_tokens, shape.output_tokens, concurrency=n)
    for rate in rates:
        results = by_rate.get(rate, [])
        if not results:
            continue  # every sweep stopped below this rate
        r = sweeps.milli(rate)
        notes = (*common, f"offered {rate:g} req/s; {len(results)} of {runs} sweeps reached it")
        points = [sweeps.point(rate, res, slos_ms=slos) for res in results]
        achieved = m.record(
            "achieved_rps_r{r}", [pt.achieved_rps for pt in points], fig_shape, notes=notes, r=r
        )
        m.record(
            "output_throughput_r{r}",
            [pt.output_tok_s for pt in points],
            fig_shape,
            notes=notes,
            r=r,
        )
        if slos:
            m.record(
                "goodput_rps_r{r}",
                [pt.goodput_rps for pt in points],
                fig_shape,
                notes=(*notes, sweeps.slo_label(slos)),
                r=r,
            )
        samples = min(len(res.records) for res in results)
        for lat in sweeps.LATENCIES:
            for p in sweeps.percentiles_to_report(samples):
                pr = sweeps.percentile_runs(results, lat, p)
                m.record(
                    f"p{sweeps.percentile_axis(p)}_{lat}_ms_r{{r}}",
                    list(pr.values),
                    fig_shape,
                    notes=(*notes, *pr.notes()),
                    r=r,
                )
        for pt in points:
            assert pt.completed > 0 and pt.output_tok_s > 0
        assert achieved.value is not None and achieved.value > 0

    knees: list[float | None] = []
    why: list[str] = []
    for i in sorted(by_run):
        pts = [sweeps.point(rate, res, slos_ms=slos) for rate, res in by_run[i]]
        k = sweeps.knee(pts, rule)
        knees.append(k.load if k.load is not None else math.nan)
        why.append(f"sweep {i + 1}: {k.describe('req/s')}")
    knee_fig = m.record("knee_rate_rps", knees, fig_shape, notes=(*common, *why))
    assert len(knees) == len(by_run) > 0
    m.progress(f"knee {knee_fig.value} req/s: " + "; ".join(why))
