"""Single-stream decode on the profile's decode shape, after a warm-up.

One figure per statistic, each with one value per run (one request per run, concurrency 1):
the decode rate (N - 1) / (t_last - t_first) = 1000 / TPOT_ms, and vLLM's TPOT itself.
"""

from __future__ import annotations

import pytest

from servelab import metrics, workloads
from servelab.figures import Shape
from servelab.plugin_measure import Measurement
from servelab.profiles import DecodeShape

pytestmark = pytest.mark.perf

#: Shape for --endpoint targets (no profile): small enough for a CPU server.
EXTERNAL_SHAPE = DecodeShape(prompt_tokens=32, output_tokens=64, runs=3)


def test_decode_c1(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("decode", EXTERNAL_SHAPE)
    results = workloads.decode(
        m.endpoint,
        prompt_tokens=shape.prompt_tokens,
        output_tokens=shape.output_tokens,
        runs=m.runs(shape.runs),
        warmup_requests=shape.warmup_requests,
        settings=m.settings,
    )
    kept = m.keep([({"run": i}, res) for i, res in enumerate(results)], may_drop=True)
    results = [res for _, res in kept]

    per_run = [metrics.compute(r.records, r.start_ns, r.end_ns) for r in results]
    rates = [x.decode_tok_s.median if x.decode_tok_s else None for x in per_run]
    tpots = [x.tpot_ms.median if x.tpot_ms else None for x in per_run]
    fig_shape = Shape(shape.prompt_tokens, shape.output_tokens, concurrency=1)
    m.record("decode_tok_s", rates, fig_shape)
    m.record("median_tpot_ms", tpots, fig_shape)
    for rate, tpot in zip(rates, tpots, strict=True):
        assert rate is not None and tpot is not None and rate > 0 and tpot > 0
        # The two are the same measurement read two ways: 1/TPOT must equal the rate.
        assert rate == pytest.approx(1000.0 / tpot, rel=1e-9)
