"""The session-cache workload (servelab.session_cache) on the served target.

Sessions with long unique prefixes, a cold pass and a reload pass; reload TTFT against cold
TTFT and the lab's sustained-decode rates as labeled figures; recall right in every session
on every pass and outputs identical across passes as the checks. Runs where the engine can
serve a reload from a cache (KV offload or prefix caching); on the CPU default that is vLLM's
prefix caching (the CPU build has no KV offload).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from servelab import prometheus
from servelab.errors import ClientError, ServelabError
from servelab.figures import Figure, Identity, Shape
from servelab.plugin import Options
from servelab.profiles import Profile, SessionCacheShape
from servelab.prompts import server_token_counter
from servelab.quality import LAB_RECORDS_KEY, QualitySet, RecallStyle
from servelab.server import Endpoint
from servelab.session_cache import reuses_cache, run_session_cache, summary

pytestmark = pytest.mark.perf

#: Shape for --endpoint targets (no profile): two small sessions.
EXTERNAL_SHAPE = SessionCacheShape(sessions=2, prefix_tokens=256, output_tokens=8, passes=2)


def test_session_cache_reload(
    pytestconfig: pytest.Config,
    servelab_endpoint: Endpoint,
    servelab_profile: Profile | None,
    servelab_identity: Identity,
    servelab_options: Options,
    servelab_quality_set: QualitySet | None,
    servelab_record: Callable[[Figure], Figure],
) -> None:
    profile = servelab_profile
    shape = EXTERNAL_SHAPE if profile is None else profile.workloads.session_cache
    name = "endpoint" if profile is None else profile.name
    if shape is None:
        pytest.skip(f"profile {name!r} defines no workloads.session_cache")
    try:
        samples: prometheus.Samples | None = prometheus.scrape(
            servelab_endpoint.base_url, servelab_endpoint.headers
        )
    except ClientError:
        samples = None
    if reuses_cache(samples) is False:
        pytest.skip(f"profile {name!r}: the engine has neither KV offload nor prefix caching")
    style = servelab_quality_set.recall if servelab_quality_set else RecallStyle()
    try:
        counter: Any = server_token_counter(servelab_endpoint)
        counter("probe")
    except ClientError:
        counter = None
    salt = hashlib.sha256(f"{name}|{time.time_ns()}".encode()).hexdigest()
    try:
        result = run_session_cache(
            servelab_endpoint,
            sessions=shape.sessions,
            prefix_tokens=shape.prefix_tokens,
            output_tokens=shape.output_tokens,
            passes=shape.passes,
            style=style,
            salt=salt,
            count=counter,
            timeout_s=600.0 if profile is None else profile.limits.request_timeout_s,
            context_len=None if profile is None else profile.model.context_len,
            profile=name,
        )
    except ServelabError as exc:
        pytest.fail(str(exc), pytrace=False)
    data = summary(result)
    pytestconfig.stash[LAB_RECORDS_KEY].session_cache[name] = data
    servelab_options.results_dir.mkdir(parents=True, exist_ok=True)
    (servelab_options.results_dir / f"session-cache-{name}.json").write_text(
        json.dumps({"schema_version": 1, **data}, indent=2)
    )

    tokens = [t for t in result.prompt_tokens if t is not None]
    fig_shape = Shape(
        prompt_tokens=min(tokens) if tokens else shape.prefix_tokens,
        output_tokens=shape.output_tokens,
        concurrency=shape.sessions,
    )
    note = (f"cache: {result.mechanism}", f"sessions {', '.join(result.labels)}")
    reload = result.passes[-1]

    def fig(
        metric: str,
        title: str,
        unit: str,
        direction: Any,
        value: float | None,
        warm: bool,
        definition: str,
    ) -> None:
        servelab_record(
            Figure(
                metric=metric,
                title=title,
                unit=unit,
                direction=direction,
                runs=(float("nan") if value is None else value,),
                shape=fig_shape,
                warm=warm,
                identity=servelab_identity,
                definition=definition,
                notes=note,
            )
        )

    fig(
        "session_cold_ttft_s",
        "session-cache cold TTFT (prefix not cached)",
        "s",
        "lower",
        result.cold_ttft_s,
        False,
        "median over sessions of first non-empty text - send, pass 1",
    )
    fig(
        "session_reload_ttft_s",
        "session-cache reload TTFT (prefix cached)",
        "s",
        "lower",
        result.reload_ttft_s,
        True,
        "median over sessions of first non-empty text - send, reload passes",
    )
    fig(
        "session_reload_speedup",
        "session-cache reload TTFT speed-up",
        "x",
        "higher",
        result.reload_speedup,
        True,
        "cold TTFT / reload TTFT",
    )
    fig(
        "session_reload_wall_tok_s",
        "session-cache sustained decode, reload pass",
        "tok/s",
        "higher",
        result.wall_tok_s(reload),
        True,
        "generated tokens / elapsed of the slowest request (the lab's wall tok/s)",
    )
    fig(
        "session_reload_first_to_last_tok_s",
        "session-cache decode, first token to last finish, reload pass",
        "tok/s",
        "higher",
        result.first_token_to_last_finish_tok_s(reload),
        True,
        "generated tokens / (last finish - first streamed text)",
    )

    problems = result.problems()
    assert not problems, "session cache failed:\n" + "\n".join(problems)
