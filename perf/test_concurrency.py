"""Closed-loop concurrency sweep on the profile's shape: at each level c, 2c requests (or
the profile's count) with at most c in flight, all due at once.

Per level: vLLM's output and total token throughput, median TTFT and TPOT, and the lab's
wall aggregate.
"""

from __future__ import annotations

from typing import Any

import pytest

from servelab import metrics, workloads
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import ConcurrencyShape

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = ConcurrencyShape(levels=(1, 2, 4), prompt_tokens=32, output_tokens=32)


def _median(d: metrics.Distribution | None) -> float | None:
    return d.median if d else None


def test_concurrency_sweep(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("concurrency", EXTERNAL_SHAPE)
    runs = m.runs(shape.runs)

    def sweep(levels: tuple[int, ...], first: bool) -> dict[int, RunResult]:
        return workloads.concurrency_sweep(
            m.endpoint,
            levels=levels,
            prompt_tokens=shape.prompt_tokens,
            output_tokens=shape.output_tokens,
            requests_per_level=shape.requests_per_level,
            warmup_requests=1 if first else 0,
            settings=m.settings,
        )

    measured = []
    for i in range(runs):
        m.progress(f"sweep {i + 1}/{runs} over c{', c'.join(map(str, shape.levels))}")
        measured += [
            ({"run": i, "concurrency": c}, r) for c, r in sweep(shape.levels, i == 0).items()
        ]

    def again(labels: list[dict[str, Any]]) -> list[tuple[dict[str, Any], RunResult]]:
        return [
            ({**x, "again": True}, sweep((x["concurrency"],), False)[x["concurrency"]])
            for x in labels
        ]

    kept = m.keep(measured, remeasure=again)
    by_level: dict[int, list[RunResult]] = {}
    for labels, res in sorted(kept, key=lambda run: run[0]["run"]):
        by_level.setdefault(labels["concurrency"], []).append(res)

    throughput: dict[int, float] = {}
    for c in shape.levels:
        per_run = [metrics.compute(r.records, r.start_ns, r.end_ns) for r in by_level[c]]
        fig_shape = Shape(shape.prompt_tokens, shape.output_tokens, concurrency=c)
        out = m.record(
            "output_throughput_c{c}", [x.output_throughput for x in per_run], fig_shape, c=c
        )
        m.record(
            "total_throughput_c{c}", [x.total_token_throughput for x in per_run], fig_shape, c=c
        )
        m.record("median_ttft_ms_c{c}", [_median(x.ttft_ms) for x in per_run], fig_shape, c=c)
        m.record("median_tpot_ms_c{c}", [_median(x.tpot_ms) for x in per_run], fig_shape, c=c)
        m.record(
            "wall_aggregate_tok_s_c{c}", [x.wall_aggregate_tok_s for x in per_run], fig_shape, c=c
        )
        for x in per_run:
            assert x.completed > 0 and x.output_throughput > 0
            # Closed loop at c with 2c requests all due at once: the cap is reached exactly.
            assert x.peak_concurrency == min(c, x.completed)
        assert out.value is not None
        throughput[c] = out.value
    assert set(throughput) == set(shape.levels)
