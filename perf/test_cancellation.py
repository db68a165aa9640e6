"""Cancellation (issue 17 item 7): closed loop at the profile's concurrency, where the client
closes a seeded share of the streams after a few token chunks, as users who stop reading do
(`servelab.workloads.cancel_plan`, `stream_completion`'s ``cancel_after``).

Figures for the streams that stayed: output throughput and p50/p90/p99 of TTFT, TPOT, ITL and
E2EL (p99.9 where the sample certifies it). And the engine's side, through its ``/metrics``
(`servelab.prometheus.wait_until_idle`): after each run no request may be left running or
waiting and KV cache usage must come back to its level before the run — the cancelled
requests' blocks were released; the time it took is a figure (`cancel_release_ms`). And the
engine must have stopped generating for them: its ``vllm:generation_tokens_total`` rose by
fewer tokens than the run would have cost without cancellations. A server without those
gauges and counters skips those checks, saying so.
"""

from __future__ import annotations

from typing import Any

import pytest

from servelab import metrics, prometheus, sweeps, workloads
from servelab.errors import ServelabError
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import CancellationShape

pytestmark = pytest.mark.perf
GENERATED = "vllm:generation_tokens_total"

EXTERNAL_SHAPE = CancellationShape(
    requests=8,
    concurrency=4,
    prompt_tokens=32,
    output_tokens=16,
    cancel_share=0.5,
    cancel_after_tokens=4,
)


def _load(m: Measurement) -> prometheus.EngineLoad | None:
    try:
        return prometheus.EngineLoad.of(prometheus.scrape(m.endpoint.base_url, m.endpoint.headers))
    except ServelabError:
        return None


def test_cancellation(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("cancellation", EXTERNAL_SHAPE)
    runs = m.runs(shape.runs)
    plan = workloads.cancel_plan(
        shape.requests, shape.cancel_share, shape.cancel_after_tokens, shape.seed
    )
    cancelled_n = sum(k is not None for k in plan)

    measured: list[tuple[dict[str, Any], RunResult]] = []
    settled: list[prometheus.Settled | None] = []
    generated: list[float | None] = []
    idle: prometheus.EngineLoad | None = None
    for i in range(runs):
        m.progress(
            f"run {i + 1}/{runs}: {shape.requests} requests at c{shape.concurrency}, "
            f"{cancelled_n} cancelled after {shape.cancel_after_tokens} tokens"
        )
        if i == 0:  # the warm-up first, then the idle level every run must come back to
            workloads.warm_up(
                m.endpoint,
                workloads.Prompts(m.endpoint),
                requests=1,
                prompt_tokens=shape.prompt_tokens,
                output_tokens=shape.output_tokens,
                settings=m.settings,
            )
            idle = _load(m)
        before = _generated(m)
        res = workloads.cancellation(
            m.endpoint,
            requests=shape.requests,
            concurrency=shape.concurrency,
            prompt_tokens=shape.prompt_tokens,
            output_tokens=shape.output_tokens,
            cancel_after=plan,
            warmup_requests=0,
            settings=m.settings,
        )
        if idle is not None and idle.kv_usage is not None:
            back = prometheus.wait_until_idle(
                m.endpoint.base_url, idle, m.endpoint.headers, timeout_s=shape.idle_timeout_s
            )
            settled.append(back)
            m.progress(back.describe())
        after = _generated(m)
        generated.append(None if before is None or after is None else after - before)
        measured.append(({"run": i}, res))

    kept = m.keep(measured, may_drop=True)
    survivors = [res.survivors() for _, res in kept]
    label = (
        f"closed loop at c{shape.concurrency}, {shape.requests} requests a run of which "
        f"{cancelled_n} ({shape.cancel_share:.0%}, seed {shape.seed}) closed by the client after "
        f"{shape.cancel_after_tokens} of {shape.output_tokens} tokens; figures over the "
        f"{shape.requests - cancelled_n} surviving streams; {len(kept)} of {runs} runs kept"
    )
    planned = shape.requests * shape.output_tokens
    read = (shape.requests - cancelled_n) * shape.output_tokens
    read += cancelled_n * shape.cancel_after_tokens
    engine = (
        "tokens the engine generated per run (vllm:generation_tokens_total): "
        + ", ".join("n/a" if g is None else f"{g:g}" for g in generated)
        + f"; the clients read {read}, a run without cancellations generates {planned}"
    )
    notes = (label, engine)
    fig_shape = Shape(shape.prompt_tokens, shape.output_tokens, concurrency=shape.concurrency)
    out = m.record(
        "cancel_survivor_output_throughput",
        [metrics.compute(r.records, r.start_ns, r.end_ns).output_throughput for r in survivors],
        fig_shape,
        notes=notes,
    )
    samples = min(len(r.records) for r in survivors)
    for lat in sweeps.LATENCIES:
        for p in sweeps.percentiles_to_report(samples):
            pr = sweeps.percentile_runs(survivors, lat, p)
            m.record(
                f"p{sweeps.percentile_axis(p)}_{lat}_ms_cancel",
                list(pr.values),
                fig_shape,
                notes=(*notes, *pr.notes()),
            )

    for _, res in kept:
        assert len(res.cancelled) == cancelled_n, res.error_reasons()
        assert all(len(r.chunk_ns) == shape.cancel_after_tokens for r in res.cancelled)
        assert all(
            r.success and r.output_tokens == shape.output_tokens for r in res.survivors().records
        )
    assert out.value is not None and out.value > 0
    if idle is None or idle.kv_usage is None:
        pytest.skip(
            f"{m.endpoint.base_url}/metrics exports no KV cache usage gauge "
            f"({prometheus.KV_USAGE}): the release of cancelled requests' blocks was not checked"
        )
    m.record(
        "cancel_release_ms",
        [None if s is None or not s.idle else s.after_s * 1000 for s in settled],
        fig_shape,
        notes=(*notes, f"idle level before the runs: {idle.describe()}"),
    )
    stuck = [f"run {i + 1}: {s.describe()}" for i, s in enumerate(settled) if s and not s.idle]
    assert not stuck, "the engine did not release the cancelled requests: " + "; ".join(stuck)
    full = [g for g in generated if g is not None and g >= planned]
    assert not full, f"the engine generated every cancelled stream to its end: {engine}"


def _generated(m: Measurement) -> float | None:
    try:
        samples = prometheus.scrape(m.endpoint.base_url, m.endpoint.headers)
    except ServelabError:
        return None
    return prometheus.total(samples, GENERATED)
