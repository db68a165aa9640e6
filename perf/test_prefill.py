"""Prefill ladder: TTFT and prefill rate per prompt length, one request at a time.

Each request is its own fresh measurement (a new prompt, nothing cached), so a figure's
``runs`` are the per-request values at that length.
"""

from __future__ import annotations

from typing import Any

import pytest

from servelab import metrics, workloads
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import PrefillShape

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = PrefillShape(prompt_tokens=(32, 64, 128), output_tokens=1, requests_per_length=2)


def test_prefill_ladder(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("prefill", EXTERNAL_SHAPE)

    def ladder(lengths: list[int], again: bool = False) -> list[tuple[dict[str, Any], RunResult]]:
        results = workloads.prefill_ladder(
            m.endpoint,
            prompt_lengths=lengths,
            output_tokens=shape.output_tokens,
            requests_per_length=m.runs(shape.requests_per_length),
            settings=m.settings,
        )
        return [
            ({"prompt_length": n, **({"again": True} if again else {})}, r)
            for n, r in results.items()
        ]

    kept = m.keep(
        ladder(list(shape.prompt_tokens)),
        remeasure=lambda labels: ladder([x["prompt_length"] for x in labels], again=True),
    )
    results = {labels["prompt_length"]: res for labels, res in kept}

    medians: dict[int, float] = {}
    for n, res in sorted(results.items()):
        ok = [r for r in res.records if r.success]
        assert all(r.prompt_tokens == n for r in ok), "the server counted another prompt length"
        ttfts = [1000 * t for r in ok if (t := metrics.ttft_s(r)) is not None]
        rates = [p for r in ok if (p := metrics.prefill_rate(r)) is not None]
        fig_shape = Shape(n, shape.output_tokens, concurrency=1)
        ttft = m.record("ttft_ms_p{n}", ttfts, fig_shape, n=n)
        m.record("prefill_tok_s_p{n}", rates, fig_shape, n=n)
        assert ttft.value is not None and ttft.value > 0
        medians[n] = ttft.value
    assert set(medians) == set(shape.prompt_tokens)
