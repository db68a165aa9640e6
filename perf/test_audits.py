"""Integrity audits on the served engine (issue 24, item 3; `servelab.audits`): first-time
measured prompts report no cached tokens, and a reissue may be faster only where the engine
declares a cache (vLLM's prefix caching, read from its /metrics); usage, streamed token ids
and re-tokenized text agree; greedy outputs at concurrency 4 are identical to the same
server's solo outputs. Each audit is a gate: a failure fails the test with its reasons.

The output-length audit (LoadGen TEST09, and the forced length behind every measured
figure) records its figures: each request's output length over the length asked, without
`ignore_eos` (`audit_output_length_ratio`: their mean within +/-10 % of 1) and with it
(`audit_forced_length_ratio`: every one exactly 1). Its prompts are number sequences the
model continues past the length asked, so an honest server reaches the length without
being forced; a server that stops short, or ignores the forced length, fails.

Each audit fails on a stand-in built to break it (tests/test_audits.py).
"""

from __future__ import annotations

import time

import pytest

from servelab import audits, prometheus
from servelab.client import completion_payload
from servelab.errors import ClientError
from servelab.figures import Shape
from servelab.loadgen import run_requests
from servelab.plugin_measure import Measurement
from servelab.prompts import server_token_counter
from servelab.session_cache import reuses_cache
from servelab.workloads import Prompts

pytestmark = pytest.mark.perf

PROMPT_TOKENS, OUTPUT_TOKENS, N = 32, 16, 4


def test_integrity_audits(servelab_measure: Measurement) -> None:
    m = servelab_measure
    ep = m.endpoint
    try:
        count = server_token_counter(ep)
        count("probe")
    except ClientError:
        pytest.skip(f"{m.name}: the server has no /tokenize to build exact prompts with")
    try:
        declared = bool(reuses_cache(prometheus.scrape(ep.base_url, ep.headers)))
    except ClientError:  # no /metrics: the engine kind's declaration (engine_traits)
        from servelab.engine_traits import traits_of

        declared = bool(traits_of(m.profile).prefix_cache)
    texts = Prompts(ep, count=count).make(PROMPT_TOKENS, "audit", N)
    s = m.settings  # the engine's own request fields (engine_traits), as measured requests
    payloads = [
        completion_payload(
            ep.model,
            t,
            OUTPUT_TOKENS,
            seed=0,
            token_ids=s.token_ids,
            ignore_eos=s.ignore_eos,
            extra=dict(s.extra_body) or None,
        )
        for t in texts
    ]
    greedy = [{**p, "temperature": 0.0} for p in payloads]
    timeout = m.timeout_s
    solo = run_requests(ep, greedy, concurrency=1, timeout_s=timeout)
    again = run_requests(ep, greedy, concurrency=1, timeout_s=timeout)
    batched = run_requests(ep, greedy, concurrency=N, timeout_s=timeout)
    m.keep([({"audit": "solo"}, solo), ({"audit": "again"}, again)])
    m.keep([({"audit": "batched"}, batched)])

    def out(text: object) -> int:
        return count(str(text))

    results = [
        audits.cache_audit(solo.records, again.records, caching_declared=declared),
        audits.token_audit(solo.records, count=out),
        audits.batch_invariance(solo.records, batched.records),
    ]
    for a in results:
        m.progress(a.describe())
    failed = [a.describe() for a in results if not a.ok]
    assert not failed, "integrity audits failed:\n" + "\n".join(failed)


LENGTH_ASKED, LENGTH_N, LENGTH_C = 16, 8, 4


def _counting(k: int) -> str:
    """A number sequence from `k`: the model continues it past any short length."""
    return ", ".join(str(k + j) for j in range(6)) + ","


def test_output_length_audit(servelab_measure: Measurement) -> None:
    m = servelab_measure
    ep, s = m.endpoint, m.settings
    salt = time.time_ns() % 10**6  # new numbers each session: no prefix-cache hit
    starts = [1000 + salt * 10 + 7919 * i for i in range(2 * LENGTH_N)]

    def bodies(ks: list[int], forced: bool) -> list[dict[str, object]]:
        return [
            completion_payload(
                ep.model,
                _counting(k),
                LENGTH_ASKED,
                seed=0,
                token_ids=s.token_ids,
                ignore_eos=forced,
                extra=dict(s.extra_body) or None,
            )
            for k in ks
        ]

    free = run_requests(
        ep, bodies(starts[:LENGTH_N], False), concurrency=LENGTH_C, timeout_s=m.timeout_s
    )
    runs = [({"audit": "length", "ignore_eos": False}, free)]
    forced = None
    if s.ignore_eos:
        forced = run_requests(
            ep, bodies(starts[LENGTH_N:], True), concurrency=LENGTH_C, timeout_s=m.timeout_s
        )
        runs.append(({"audit": "length", "ignore_eos": True}, forced))
    else:
        m.progress("forced length not audited: the engine has no ignore_eos (engine_traits)")
    results = [audits.length_audit(free.records, LENGTH_ASKED)]
    if forced is not None:
        results.append(audits.forced_length_audit(forced.records, LENGTH_ASKED))
    for a in results:
        m.progress(a.describe())
    m.keep(runs)
    shape = Shape(prompt_tokens=None, output_tokens=LENGTH_ASKED, concurrency=LENGTH_C)
    note = f"{LENGTH_N} number-sequence prompts, max_tokens {LENGTH_ASKED}, concurrency {LENGTH_C}"
    m.record(
        "audit_output_length_ratio",
        audits.length_ratios(free.records, LENGTH_ASKED),
        shape,
        notes=(note, results[0].describe()),
    )
    if forced is not None:
        m.record(
            "audit_forced_length_ratio",
            audits.length_ratios(forced.records, LENGTH_ASKED),
            shape,
            notes=(note, results[1].describe()),
        )
    failed = [a.describe() for a in results if not a.ok]
    assert not failed, "output-length audit failed:\n" + "\n".join(failed)
