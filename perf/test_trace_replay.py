"""Trace replay (issue 17 item 6): a Mooncake-layout JSONL trace (timestamp, input and output
length, prefix hash ids) replayed open loop, each request due at its timestamp divided by the
profile's speed-up, with exact prompt and output lengths.

Figures: the achieved request rate and output throughput, and p50/p90/p99 of TTFT, TPOT, ITL
and E2EL (p99.9 where the sample certifies it) with the sample count behind each.

With the profile's ``shared_prefixes`` (the default) requests that share hash ids share those
prompt blocks: each hash id is the same ``block_tokens`` token ids wherever it appears
(`servelab.traces.prompt_token_ids`), so the replay exercises the prefix cache as the traced
service's did; each run draws new ids, so runs share nothing with each other. The share of
prompt tokens the engine served from its cache (`trace_cached_share`) is a figure; its notes
give the share a cache could serve, at the trace's block size and at the engine's (vLLM's
``vllm:cache_config_info``). Without it every prompt is new text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from servelab import prometheus, sweeps, traces, workloads
from servelab.errors import ServelabError
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import TraceShape

pytestmark = pytest.mark.perf

REPO = Path(__file__).resolve().parents[1]
EXTERNAL_SHAPE = TraceShape(
    path=str(REPO / "fixtures" / "traces" / "mooncake-shared.jsonl"), block_tokens=64
)


def _engine_block(m: Measurement) -> int | None:
    """The engine's KV block size (vLLM's vllm:cache_config_info), None where not exported."""
    try:
        samples = prometheus.scrape(m.endpoint.base_url, m.endpoint.headers)
    except ServelabError:  # no /metrics: the engine-level share is not known
        return None
    labels = prometheus.labels_of(samples, prometheus.CACHE_CONFIG) or {}
    block = labels.get("block_size", "")
    return int(block) if block.isdigit() else None


def _cached_share(res: RunResult) -> float | None:
    ok = [r for r in res.records if r.success]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    if not prompt or any(r.cached_tokens is None for r in ok):
        return None
    return sum(r.cached_tokens or 0 for r in ok) / prompt


def test_trace_replay(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("trace", EXTERNAL_SHAPE)
    base = m.profile.path.parent if m.profile is not None and m.profile.path else REPO
    trace = traces.load_trace(base / shape.path, block_tokens=shape.block_tokens)
    offsets = traces.replay_offsets(trace, shape.speedup)
    lengths = traces.lengths(trace)
    runs = m.runs(shape.runs)
    pool = workloads.token_pool(m.endpoint) if shape.shared_prefixes else None

    measured: list[tuple[dict[str, Any], RunResult]] = []
    for i in range(runs):
        m.progress(f"replay {i + 1}/{runs}: {len(offsets)} requests over {offsets[-1]:.3g} s")
        ids = None
        if pool is not None:  # a fresh draw per run: runs share no prefix with each other
            ids = traces.prompt_token_ids(trace, pool, nonce=f"trace:{time.time_ns()}:{i}")
        res = workloads.replay(
            m.endpoint,
            lengths=lengths,
            offsets_s=offsets,
            warmup_requests=1 if i == 0 else 0,
            settings=m.settings,
            prompt_ids=ids,
        )
        measured.append(({"run": i}, res))
    results = [res for _, res in m.keep(measured, may_drop=True)]

    n = len(trace.entries)
    block = _engine_block(m) if pool is not None else None
    if pool is not None:
        sharing = (
            f"prompts share the trace's hash-id blocks ({trace.block_tokens} tokens an id, "
            f"the same token ids for the same id; fresh ids every run): a cache could serve "
            f"{traces.cacheable_share(trace):.1%} of prompt tokens at the trace's blocks"
            + (
                f", {traces.cacheable_share(trace, block):.1%} at the engine's {block}-token blocks"
                if block
                else ""
            )
        )
    else:
        sharing = "prompts are new (shared hash ids not replayed as shared prefixes)"
    notes = (
        trace.describe(shape.speedup),
        f"open loop, no concurrency cap; {n} requests per run, {len(results)} of {runs} runs "
        f"kept; {sharing}",
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
    if pool is not None:
        shares = [_cached_share(res) for res in results]
        m.record("trace_cached_share", shares, fig_shape, notes=notes)
        hits = [res.server_cache_hits for res in results]
        m.progress(f"{sharing}; served from cache per run: {shares} (server counted {hits})")
    for pt in points:
        assert pt.completed == n and pt.output_tok_s > 0
    assert out.value is not None and out.value > 0
