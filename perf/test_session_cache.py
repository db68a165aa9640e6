"""The session-cache workload (servelab.session_cache) on the served target.

Sessions with long unique prefixes, a cold pass and a reload pass; reload TTFT against cold
TTFT and the lab's sustained-decode rates as labeled figures; recall right in every session
on every pass and outputs identical across passes as the checks. Runs where the engine can
serve a reload from a cache (KV offload or prefix caching); on the CPU default that is vLLM's
prefix caching (the CPU build has no KV offload).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest

from servelab import prometheus
from servelab.engine_traits import traits_of
from servelab.errors import ClientError, ServelabError
from servelab.figures import Shape
from servelab.plugin_measure import Measurement
from servelab.profiles import SessionCacheShape
from servelab.prompts import server_token_counter
from servelab.quality import QualitySet, RecallStyle
from servelab.session_cache import reuses_cache, run_session_cache, summary

pytestmark = pytest.mark.perf

#: Shape for --endpoint targets (no profile): two small sessions.
EXTERNAL_SHAPE = SessionCacheShape(sessions=2, prefix_tokens=256, output_tokens=8, passes=2)


def test_session_cache_reload(
    servelab_measure: Measurement, servelab_quality_set: QualitySet | None
) -> None:
    m = servelab_measure
    profile = m.profile
    shape = m.shape("session_cache", EXTERNAL_SHAPE)
    name = m.name
    endpoint = m.endpoint
    try:
        samples: prometheus.Samples | None = prometheus.scrape(endpoint.base_url, endpoint.headers)
    except ClientError:
        samples = None
    if reuses_cache(samples) is False:
        pytest.skip(f"profile {name!r}: the engine has neither KV offload nor prefix caching")
    style = servelab_quality_set.recall if servelab_quality_set else RecallStyle()
    try:
        counter: Any = server_token_counter(endpoint)
        counter("probe")
    except ClientError:
        counter = None
    runs = m.runs(shape.runs)
    results = []
    for i in range(runs):
        m.progress(
            f"run {i + 1}/{runs}: {shape.sessions} sessions x {shape.passes} passes, "
            f"{shape.prefix_tokens}-token prefixes"
        )
        salt = hashlib.sha256(f"{name}|{i}|{time.time_ns()}".encode()).hexdigest()
        try:
            results.append(
                run_session_cache(
                    endpoint,
                    sessions=shape.sessions,
                    prefix_tokens=shape.prefix_tokens,
                    output_tokens=shape.output_tokens,
                    passes=shape.passes,
                    style=style,
                    salt=salt,
                    count=counter,
                    timeout_s=600.0 if profile is None else m.timeout_s,
                    context_len=None if profile is None else profile.model.context_len,
                    profile=name,
                    cache_exact=traits_of(profile).cache_exact,
                )
            )
        except ServelabError as exc:
            pytest.fail(str(exc), pytrace=False)
    m.results.session_cache[name] = {"runs": [summary(r) for r in results]}

    result = results[0]
    tokens = [t for r in results for t in r.prompt_tokens if t is not None]
    # The shape is the configured one: the measured prompt length moves by a token with each
    # run's salt, and a figure's key (its baseline entry) must not move with it.
    fig_shape = Shape(
        prompt_tokens=shape.prefix_tokens,
        output_tokens=shape.output_tokens,
        concurrency=shape.sessions,
    )
    measured = f"{min(tokens)}-{max(tokens)}" if tokens else "unknown"
    notes = (
        f"cache: {result.mechanism}",
        f"sessions {', '.join(result.labels)}",
        f"prompt tokens per session as served: {measured}",
        *(f"run {i}: {n}" for i, r in enumerate(results) for n in r.differing_outputs()),
    )
    for name_, values, warm in (
        ("session_cold_ttft_s", [r.cold_ttft_s for r in results], False),
        ("session_reload_ttft_s", [r.reload_ttft_s for r in results], True),
        ("session_reload_speedup", [r.reload_speedup for r in results], True),
        ("session_reload_wall_tok_s", [r.wall_tok_s(r.passes[-1]) for r in results], True),
        (
            "session_reload_first_to_last_tok_s",
            [r.first_token_to_last_finish_tok_s(r.passes[-1]) for r in results],
            True,
        ),
    ):
        m.record(name_, values, fig_shape, warm=warm, notes=notes)

    problems = [f"run {i}: {p}" for i, r in enumerate(results) for p in r.problems()]
    assert not problems, "session cache failed:\n" + "\n".join(problems)
