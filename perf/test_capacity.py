"""Capacity under SLOs (issue 17 item 3): the highest open-loop offered rate at which the p99
of TTFT and of TPOT hold the profile's bounds, found by bracketing (rate x factor until a
level fails) and then bisection, within a budget of levels per search.

One figure, `capacity_rps`, one value per search; its notes give the SLOs, each level's
percentiles against them, and whether the sample certifies the percentile
(`servelab.certify`) or only its value holds it.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from servelab import arrivals, capacity, sweeps, workloads
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import CapacityShape

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = CapacityShape(
    prompt_tokens=32,
    output_tokens=8,
    requests_per_level=6,
    start_rps=2.0,
    max_runs=3,
    rel_tol=0.25,
    slo_ttft_ms=1000.0,
    slo_tpot_ms=150.0,
)


def test_capacity_under_slos(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("capacity", EXTERNAL_SHAPE)
    slos = sweeps.slos_ms(shape.slo_ttft_ms, shape.slo_tpot_ms)
    runs = m.runs(shape.runs)
    n = shape.requests_per_level
    measured: list[tuple[dict[str, Any], RunResult]] = []
    found: list[capacity.Capacity] = []
    for i in range(runs):
        m.progress(f"search {i + 1}/{runs} from {shape.start_rps:g} req/s")

        def measure(rate: float, i: int = i) -> capacity.SloCheck:
            plan = arrivals.schedule(n, rate, burstiness=shape.burstiness, seed=shape.seed)
            res = workloads.open_loop(
                m.endpoint,
                schedule=plan,
                prompt_tokens=shape.prompt_tokens,
                output_tokens=shape.output_tokens,
                warmup_requests=0 if measured else 1,
                settings=m.settings,
            )
            measured.append(({"run": i, "rate_rps": rate}, res))
            return capacity.slo_check(rate, res, slos, shape.percentile)

        found.append(
            capacity.capacity_search(
                measure,
                shape.start_rps,
                factor=shape.factor,
                max_runs=shape.max_runs,
                rel_tol=shape.rel_tol,
            )
        )
    kept = m.keep(measured, may_drop=True)
    # A search with a dropped level (the client lagged) does not count.
    dropped = {x["run"] for x, res in measured if not any(res is r for _, r in kept)}
    searches = [cap for i, cap in enumerate(found) if i not in dropped]
    notes = (
        sweeps.arrival_label(shape.burstiness, shape.seed),
        sweeps.slo_label(slos).replace("goodput SLOs", f"SLOs at p{shape.percentile:g}"),
        f"open loop, no concurrency cap; {n} requests per level; search from "
        f"{shape.start_rps:g} req/s, x{shape.factor:g} then bisection to {shape.rel_tol:g} "
        f"relative gap, at most {shape.max_runs} levels; {len(searches)} of {runs} searches",
        *(f"search {i + 1}: {cap.describe('req/s')}" for i, cap in enumerate(searches)),
        *(f"search {i + 1}, {c.detail}" for i, cap in enumerate(searches) for c in cap.checks),
    )
    values = [cap.load if cap.load is not None else math.nan for cap in searches]
    fig = m.record(
        "capacity_rps",
        values,
        Shape(shape.prompt_tokens, shape.output_tokens, concurrency=n),
        notes=notes,
    )
    assert searches and all(cap.checks for cap in searches)
    m.progress(f"capacity {fig.value} req/s: " + "; ".join(c.describe("req/s") for c in searches))
