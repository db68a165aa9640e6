"""Trace replay (issue 17 item 6): a Mooncake-layout JSONL trace (timestamp, input and output
length, prefix hash ids) replayed open loop, each request due at its timestamp divided by the
profile's speed-up, with exact prompt and output lengths.

Figures: the achieved request rate and output throughput, and p50/p90/p99 of TTFT, TPOT, ITL
and E2EL (p99.9 where the sample certifies it) with the sample count behind each. Every
prompt is new (unique salts): the trace's shared hash ids are counted in the notes, not
replayed as shared prefixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servelab import sweeps, traces, workloads
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import TraceShape

pytestmark = pytest.mark.perf

REPO = Path(__file__).resolve().parents[1]
EXTERNAL_SHAPE = TraceShape(path=str(REPO / "fixtures" / "traces" / "mooncake-small.jsonl"))


def test_trace_replay(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("trace", EXTERNAL_SHAPE)
    base = m.profile.path.parent if m.profile is not None and m.profile.path else REPO
    trace = traces.load_trace(base / shape.path)
    offsets = traces.replay_offsets(trace, shape.speedup)
    lengths = traces.lengths(trace)
    runs = m.runs(shape.runs)

    measured: list[tuple[dict[str, Any], RunResult]] = []
    for i in range(runs):
        m.progress(f"replay {i + 1}/{runs}: {len(offsets)} requests over {offsets[-1]:.3g} s")
        res = workloads.replay(
            m.endpoint,
            lengths=lengths,
            offsets_s=offsets,
            warmup_requests=1 if i == 0 else 0,
            settings=m.settings,
        )
        measured.append(({"run": i}, res))
    results = [res for _, res in m.keep(measured, may_drop=True)]

    n = len(trace.entries)
    notes = (
        trace.describe(shape.speedup),
        f"open loop, no concurrency cap; {n} requests per run, {len(results)} of {runs} runs "
        "kept; prompts are new (shared hash ids not replayed as shared prefixes)",
    )
    ins = [a for a, _ in lengths]
    outs = [b for _, b in lengths]
    fig_shape = Shape(max(ins), max(outs), concurrency=n)
    points = [sweeps.point(0.0, res, open_loop=False) for res in results]
    m.record("trace_achieved_rps", [pt.achieved_rps for pt in points], fig_shape, notes=notes)
    out = m.record(
        "trace_output_throughput", [pt.output_tok_s for pt in points], fig_shape, notes=notes
    )
    for lat in sweeps.LATENCIES:
        for p in sweeps.percentiles_to_report(n):
            pr = sweeps.percentile_runs(results, lat, p)
            m.record(
                f"p{sweeps.percentile_axis(p)}_{lat}_ms_trace",
                list(pr.values),
                fig_shape,
                notes=(*notes, *pr.notes()),
            )
    for pt in points:
        assert pt.completed == n and pt.output_tok_s > 0
    assert out.value is not None and out.value > 0
