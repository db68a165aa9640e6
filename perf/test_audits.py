"""Integrity audits on the served engine (issue 24, item 3; `servelab.audits`): first-time
measured prompts report no cached tokens, and a reissue may be faster only where the engine
declares a cache (vLLM's prefix caching, read from its /metrics); usage, streamed token ids
and re-tokenized text agree; greedy outputs at concurrency 4 are identical to the same
server's solo outputs. Each audit is a gate: a failure fails the test with its reasons.

Each audit fails on a stand-in built to break it (tests/test_audits.py).
"""

from __future__ import annotations

import pytest

from servelab import audits, prometheus
from servelab.client import completion_payload
from servelab.errors import ClientError
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
    except ClientError:
        declared = False
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
