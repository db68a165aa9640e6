"""Prefill ladder: TTFT and prefill rate per prompt length, one request at a time.

Each request is its own fresh measurement (a new prompt, nothing cached), so a figure's
``runs`` are the per-request values at that length.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from servelab import metrics, workloads
from servelab.figures import Figure, Identity, Shape
from servelab.plugin import Options, RunState
from servelab.profiles import Limits, PrefillShape, Profile
from servelab.records import request_row
from servelab.server import Endpoint

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = PrefillShape(prompt_tokens=(32, 64, 128), output_tokens=1, requests_per_length=2)


def test_prefill_ladder(
    servelab_endpoint: Endpoint,
    servelab_profile: Profile | None,
    servelab_identity: Identity,
    servelab_options: Options,
    servelab_record: Callable[[Figure], Figure],
    servelab_state: RunState,
) -> None:
    shape = (servelab_profile.workloads.prefill if servelab_profile else None) or EXTERNAL_SHAPE
    limits = servelab_profile.limits if servelab_profile else Limits()
    per_length = servelab_options.runs or shape.requests_per_length
    results = workloads.prefill_ladder(
        servelab_endpoint,
        prompt_lengths=shape.prompt_tokens,
        output_tokens=shape.output_tokens,
        requests_per_length=per_length,
        settings=workloads.Settings(timeout_s=limits.request_timeout_s),
    )
    servelab_state.requests += [
        request_row(r, test="test_prefill_ladder", prompt_length=n)
        for n, res in results.items()
        for r in res.records
    ]
    problems = [
        f"prompt {n}: {why}"
        for n, res in results.items()
        for why in res.invalid_reasons(limits.max_error_rate)
    ]
    if problems:
        pytest.fail("prefill runs are not valid:\n" + "\n".join(problems), pytrace=False)

    medians: dict[int, float] = {}
    for n, res in results.items():
        ok = [r for r in res.records if r.success]
        assert all(r.prompt_tokens == n for r in ok), "the server counted another prompt length"
        ttfts = tuple(1000 * t for r in ok if (t := metrics.ttft_s(r)) is not None)
        rates = tuple(p for r in ok if (p := metrics.prefill_rate(r)) is not None)
        fig_shape = Shape(n, shape.output_tokens, concurrency=1)
        ttft_fig = Figure(
            metric=f"ttft_ms_p{n}",
            title=f"time to first token, {n}-token prompt",
            unit="ms",
            direction="lower",
            runs=ttfts,
            shape=fig_shape,
            warm=True,
            identity=servelab_identity,
            definition="first chunk with non-empty choices - send (vLLM TTFT); one request per "
            "value",
        )
        rate_fig = Figure(
            metric=f"prefill_tok_s_p{n}",
            title=f"prefill rate (lower bound), {n}-token prompt",
            unit="tok/s",
            direction="higher",
            runs=rates,
            shape=fig_shape,
            warm=True,
            identity=servelab_identity,
            definition="usage.prompt_tokens / TTFT per request (TTFT also holds scheduling and "
            "the first decode step, so this is a lower bound)",
        )
        for fig in (ttft_fig, rate_fig):
            servelab_record(fig)
            print(fig.label())
        assert ttft_fig.value is not None and ttft_fig.value > 0
        medians[n] = ttft_fig.value
    assert set(medians) == set(shape.prompt_tokens)
