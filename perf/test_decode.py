"""Single-stream decode on the profile's decode shape, after a warm-up.

One figure per statistic, each with one value per run (one request per run, concurrency 1):
the decode rate (N - 1) / (t_last - t_first) = 1000 / TPOT_ms, and vLLM's TPOT itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from servelab import metrics, workloads
from servelab.figures import Figure, Identity, Shape
from servelab.plugin import Options, RunState
from servelab.profiles import DecodeShape, Limits, Profile
from servelab.records import request_row
from servelab.server import Endpoint

pytestmark = pytest.mark.perf

#: Shape for --endpoint targets (no profile): small enough for a CPU server.
EXTERNAL_SHAPE = DecodeShape(prompt_tokens=32, output_tokens=64, runs=3)


def test_decode_c1(
    servelab_endpoint: Endpoint,
    servelab_profile: Profile | None,
    servelab_identity: Identity,
    servelab_options: Options,
    servelab_record: Callable[[Figure], Figure],
    servelab_state: RunState,
) -> None:
    shape = (servelab_profile.workloads.decode if servelab_profile else None) or EXTERNAL_SHAPE
    limits = servelab_profile.limits if servelab_profile else Limits()
    runs = servelab_options.runs or shape.runs
    results = workloads.decode(
        servelab_endpoint,
        prompt_tokens=shape.prompt_tokens,
        output_tokens=shape.output_tokens,
        runs=runs,
        warmup_requests=shape.warmup_requests,
        settings=workloads.Settings(timeout_s=limits.request_timeout_s),
    )
    servelab_state.requests += [
        request_row(r, test="test_decode_c1", run=i)
        for i, res in enumerate(results)
        for r in res.records
    ]
    problems = [
        f"run {i}: {why}"
        for i, res in enumerate(results)
        for why in res.invalid_reasons(limits.max_error_rate)
    ]
    if problems:
        pytest.fail("decode runs are not valid:\n" + "\n".join(problems), pytrace=False)

    per_run = [metrics.compute(r.records, r.start_ns, r.end_ns) for r in results]
    rates = [m.decode_tok_s.median if m.decode_tok_s else float("nan") for m in per_run]
    tpots = [m.tpot_ms.median if m.tpot_ms else float("nan") for m in per_run]
    fig_shape = Shape(shape.prompt_tokens, shape.output_tokens, concurrency=1)
    rate_fig = Figure(
        metric="decode_tok_s",
        title="single-stream decode rate",
        unit="tok/s",
        direction="higher",
        runs=tuple(rates),
        shape=fig_shape,
        warm=True,
        identity=servelab_identity,
        definition="(N - 1) / (t_last_token_chunk - t_first_token_chunk), one request per run "
        "(= 1000 / TPOT_ms); N = usage.completion_tokens",
    )
    tpot_fig = Figure(
        metric="median_tpot_ms",
        title="time per output token (vLLM TPOT)",
        unit="ms",
        direction="lower",
        runs=tuple(tpots),
        shape=fig_shape,
        warm=True,
        identity=servelab_identity,
        definition="(E2EL - TTFT) / (N - 1) per request, vLLM calculate_metrics",
    )
    for fig in (rate_fig, tpot_fig):
        servelab_record(fig)
        print(fig.label())
    for rate, tpot in zip(rates, tpots, strict=True):
        assert rate > 0 and tpot > 0
        # The two are the same measurement read two ways: 1/TPOT must equal the rate.
        assert rate == pytest.approx(1000.0 / tpot, rel=1e-9)
