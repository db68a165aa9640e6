"""Workloads: which requests to send, in which pattern, and what counts as one run.
(Over 400 lines: the workloads share one Settings, one run step and one stop rule.)

Every workload builds its prompts first (exact token length, unique salts), warms the server
up with prompts of its own (never sharing a prefix with measured ones), then measures. The
results are `loadgen.RunResult`s: metrics come afterwards from `servelab.metrics`.

Salts carry a per-call ``nonce`` (default: the wall clock in ns) so that rerunning a workload
against the same long-lived server never meets its own earlier prompts in the prefix cache.

Every request is bounded (`Settings.for_limits`: the profile's ``limits`` and the command
line's overrides), and a workload stops with a ClientError as soon as the server is shown
stuck (a request got no first token within its timeout while no other got a token) or its
test's deadline passes, instead of sending every remaining request into the same wall.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from servelab import arrivals as arrivals_mod
from servelab import prometheus
from servelab.client import DEFAULT_TIMEOUT_S, completion_payload
from servelab.errors import ClientError
from servelab.loadgen import DEFAULT_MAX_LOOP_LAG_MS, RunResult, run_requests
from servelab.metrics import output_rate_in, steady_state_window
from servelab.prompts import (
    TokenCounter,
    endpoint_token_counter,
    exact_text,
    server_token_counter,
)
from servelab.server import Endpoint

PREFIX_HITS_METRIC = "vllm:prefix_cache_hits_total"
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How requests are sent, shared by every workload."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    first_token_timeout_s: float | None = None
    token_ids: bool = True  # vLLM's return_token_ids: per-chunk token counts
    ignore_eos: bool = True  # force the output length (checked per request)
    # Engine-specific body fields of every measured request (EngineTraits.measured_extra).
    extra_body: tuple[tuple[str, object], ...] = ()
    workers: int = 1
    progress: bool = True
    # Where progress goes instead of a tqdm bar on stderr (which pytest captures): the
    # plugin passes a writer to its terminal reporter. Called with "decode runs 3/14".
    report: Callable[[str], None] | None = None
    max_loop_lag_ms: float = DEFAULT_MAX_LOOP_LAG_MS
    nonce: str | None = None
    check_server_cache: bool = True  # scrape the server's prefix-cache hit counter per run
    stop_when_stuck: bool = True  # raise once the server is shown stuck (see module doc)
    deadline_ns: int | None = None  # perf_counter_ns after which the workload stops

    @classmethod
    def for_limits(
        cls,
        limits: object | None,
        *,
        request_timeout_s: float | None = None,
        first_token_timeout_s: float | None = None,
        test_timeout_s: float | None = None,
        **settings: Any,
    ) -> Settings:
        """Settings bounded by a profile's ``limits`` (None: an external endpoint) and the
        command line: ``request_timeout_s`` (``--request-timeout``) replaces
        ``limits.request_timeout_s`` and caps the first-token wait; ``first_token_timeout_s``
        replaces ``limits.first_token_timeout_s``; ``test_timeout_s`` (else
        ``limits.test_timeout_s``) sets a deadline from now for the whole workload."""
        total, first = request_timeouts(
            limits, request_timeout_s=request_timeout_s, first_token_timeout_s=first_token_timeout_s
        )
        whole = test_timeout_s if test_timeout_s is not None else _limit(limits, "test_timeout_s")
        deadline = None if whole is None else time.perf_counter_ns() + int(whole * 1e9)
        return cls(timeout_s=total, first_token_timeout_s=first, deadline_ns=deadline, **settings)


def _limit(limits: object | None, name: str) -> float | None:
    value = getattr(limits, name, None)  # fields a profile may not have yet
    return None if value is None else float(value)


def request_timeouts(
    limits: object | None,
    *,
    request_timeout_s: float | None = None,
    first_token_timeout_s: float | None = None,
) -> tuple[float, float | None]:
    """(whole request, first token) timeouts in seconds from a profile's ``limits`` and the
    command line's overrides (see `Settings.for_limits`); the first-token wait never exceeds
    the whole request's."""
    total = request_timeout_s
    if total is None:
        total = _limit(limits, "request_timeout_s") or DEFAULT_TIMEOUT_S
    first = first_token_timeout_s
    if first is None:
        first = _limit(limits, "first_token_timeout_s")
    return total, None if first is None else min(first, total)


class Prompts:
    """Exact-length, unique prompts for one endpoint, counted once per (length, salt)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        count: TokenCounter | None = None,
        nonce: str | None = None,
        model_dir: str | None = None,
    ) -> None:
        """``count`` defaults to the server's ``/tokenize``; where the server has none and
        ``model_dir`` is given, the model's own tokenizer counts instead."""
        self.endpoint = endpoint
        if count is None:
            count = (
                server_token_counter(endpoint)
                if model_dir is None
                else endpoint_token_counter(endpoint, model_dir)
            )
        self.count = count
        self.nonce = nonce if nonce is not None else str(time.time_ns())

    def make(self, n_tokens: int, tag: str, k: int) -> list[str]:
        """``k`` distinct prompts of ``n_tokens`` tokens, salts ``tag:nonce:i``."""
        texts = [exact_text(self.count, n_tokens, f"{tag}:{self.nonce}:{i}") for i in range(k)]
        if len(set(texts)) != len(texts):
            raise ClientError(f"prompts {tag!r}: duplicate prompt texts; use more tokens")
        return texts


def payloads(
    endpoint: Endpoint, texts: Sequence[str], output_tokens: int, s: Settings
) -> list[dict[str, Any]]:
    """Measured completion bodies: forced length, token ids and the engine's own fields as
    ``s`` says (`Settings`, from the engine's traits)."""
    return [
        completion_payload(
            endpoint.model,
            t,
            output_tokens,
            ignore_eos=s.ignore_eos,
            token_ids=s.token_ids,
            extra=dict(s.extra_body) or None,
        )
        for t in texts
    ]


def _run(
    endpoint: Endpoint,
    texts: Sequence[str],
    prompt_tokens: int,
    output_tokens: int,
    s: Settings,
    *,
    concurrency: int | None,
    arrivals_s: Sequence[float] | None = None,
    progress: bool | None = None,
    cancel_after: Sequence[int | None] | None = None,
) -> RunResult:
    before = server_cache_hits(endpoint) if s.check_server_cache else None
    res = run_requests(
        endpoint,
        payloads(endpoint, texts, output_tokens, s),
        concurrency=concurrency,
        arrivals_s=arrivals_s,
        prompt_tokens=[prompt_tokens] * len(texts),
        timeout_s=s.timeout_s,
        first_token_timeout_s=s.first_token_timeout_s,
        workers=s.workers,
        progress=s.progress if progress is None else progress,
        max_loop_lag_ms=s.max_loop_lag_ms,
        deadline_ns=s.deadline_ns,
        stop_when_stuck=s.stop_when_stuck,
        cancel_after=cancel_after,
    )
    stop_if_stuck(endpoint, res, s)
    after = server_cache_hits(endpoint) if before is not None else None
    if before is not None and after is not None:
        res = dataclasses.replace(res, server_cache_hits=after - before)
    return res


def stop_if_stuck(endpoint: Endpoint, res: RunResult, s: Settings) -> None:
    """Raise ClientError when the server is shown stuck or the workload's deadline passed."""
    why = res.stuck() if s.stop_when_stuck else None
    if why is not None:
        raise ClientError(
            f"{endpoint.base_url}: the server is stuck: {why}. The workload stopped instead "
            "of waiting the same timeout for every remaining request; look at the server's "
            "log. limits.first_token_timeout_s (or --request-timeout) bounds this wait"
        )
    if s.deadline_ns is not None and time.perf_counter_ns() >= s.deadline_ns:
        failed = "; ".join(res.error_reasons(3)) or "none failed"
        raise ClientError(
            f"{endpoint.base_url}: the test's deadline passed before its workload ended "
            f"(last run: {failed}); limits.test_timeout_s bounds a test"
        )


def server_cache_hits(endpoint: Endpoint, timeout_s: float = 10.0) -> float | None:
    """The server's prefix-cache hit counter (vLLM's Prometheus ``/metrics``), summed over
    engines; None when the server does not expose it."""
    try:
        samples = prometheus.scrape(endpoint.base_url, endpoint.headers, timeout_s=timeout_s)
    except ClientError:  # unreachable, no /metrics, or not a Prometheus page: no counter
        return None
    return prometheus.total(samples, PREFIX_HITS_METRIC)


def _progress(
    items: Sequence[T], desc: str, enabled: bool, report: Callable[[str], None] | None = None
) -> Iterable[T]:
    """Items with a progress bar on stderr, shown only once the loop has run > 2 s; or, with
    `report`, a line before each item."""
    if not enabled:
        return items
    if report is not None:
        return _reported(items, desc, report)
    from tqdm import tqdm

    bar: Iterable[T] = tqdm(items, desc=desc, unit="run", file=sys.stderr, delay=2.0, leave=False)
    return bar


def _reported(items: Sequence[T], desc: str, report: Callable[[str], None]) -> Iterator[T]:
    for i, item in enumerate(items, 1):
        report(f"{desc} {i}/{len(items)}")
        yield item


def warm_up(
    endpoint: Endpoint,
    prompts: Prompts,
    *,
    requests: int,
    prompt_tokens: int,
    output_tokens: int,
    concurrency: int = 1,
    settings: Settings | None = None,
) -> RunResult | None:
    """Send warm-up requests (own salts, excluded from every measurement).

    Raises ClientError when every warm-up request failed: measuring a server that cannot
    answer one request would only produce a page of identical failures.
    """
    if requests <= 0:
        return None
    s = settings or Settings()
    texts = prompts.make(prompt_tokens, "warmup", requests)
    res = _run(
        endpoint, texts, prompt_tokens, output_tokens, s, concurrency=concurrency, progress=False
    )
    if len(res.failed) == len(res.records):
        raise ClientError(
            f"warm-up against {endpoint.base_url}: all {requests} requests failed: "
            + "; ".join(res.error_reasons(3))
        )
    return res


# --------------------------------------------------------------------------- workloads


def _measured_after_warm_up(
    endpoint: Endpoint,
    p: Prompts,
    tag: str,
    count: int,
    prompt_tokens: int,
    output_tokens: int,
    s: Settings,
    warmup_requests: int,
) -> list[str]:
    """A workload's measured prompts (`count` of `prompt_tokens`, made first so no warm-up
    prompt is among them), then the warm-up at the same lengths."""
    texts = p.make(prompt_tokens, tag, count)
    warm_up(
        endpoint,
        p,
        requests=warmup_requests,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        settings=s,
    )
    return texts


def decode(
    endpoint: Endpoint,
    *,
    prompt_tokens: int,
    output_tokens: int,
    runs: int,
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
) -> list[RunResult]:
    """Single-stream decode: ``runs`` runs of one request each at concurrency 1."""
    s = settings or Settings()
    p = prompts or Prompts(endpoint, nonce=s.nonce)
    texts = _measured_after_warm_up(
        endpoint, p, "decode", runs, prompt_tokens, output_tokens, s, warmup_requests
    )
    return [
        _run(endpoint, [t], prompt_tokens, output_tokens, s, concurrency=1, progress=False)
        for t in _progress(texts, "decode runs", s.progress, s.report)
    ]


def prefill_ladder(
    endpoint: Endpoint,
    *,
    prompt_lengths: Sequence[int],
    output_tokens: int = 1,
    requests_per_length: int = 1,
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
) -> dict[int, RunResult]:
    """TTFT and prefill rate per prompt length, one request at a time (concurrency 1)."""
    s = settings or Settings()
    p = prompts or Prompts(endpoint, nonce=s.nonce)
    if not prompt_lengths:
        raise ClientError("prefill ladder: no prompt lengths given")
    plan = {n: p.make(n, f"prefill{n}", requests_per_length) for n in prompt_lengths}
    warm_up(
        endpoint,
        p,
        requests=warmup_requests,
        prompt_tokens=min(prompt_lengths),
        output_tokens=max(1, output_tokens),
        settings=s,
    )
    return {
        n: _run(endpoint, plan[n], n, output_tokens, s, concurrency=1, progress=False)
        for n in _progress(list(plan), "prefill lengths", s.progress, s.report)
    }


def concurrency_sweep(
    endpoint: Endpoint,
    *,
    levels: Sequence[int],
    prompt_tokens: int,
    output_tokens: int,
    requests_per_level: int = 0,
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
) -> dict[int, RunResult]:
    """Closed loop: at each level c, send ``requests_per_level`` requests (0: 2c) with at
    most c in flight, all due at once (vLLM's ``--request-rate inf --max-concurrency c``)."""
    s = settings or Settings()
    p = prompts or Prompts(endpoint, nonce=s.nonce)
    if not levels or min(levels) < 1:
        raise ClientError(f"concurrency sweep: levels must be >= 1 (got {list(levels)})")
    plan = {c: p.make(prompt_tokens, f"conc{c}", requests_per_level or 2 * c) for c in levels}
    warm_up(
        endpoint,
        p,
        requests=max(warmup_requests, 0),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        concurrency=max(1, min(levels)),
        settings=s,
    )
    return {
        c: _run(endpoint, texts, prompt_tokens, output_tokens, s, concurrency=c)
        for c, texts in plan.items()
    }


def open_loop(
    endpoint: Endpoint,
    *,
    schedule: arrivals_mod.Schedule,
    prompt_tokens: int,
    output_tokens: int,
    max_concurrency: int | None = None,
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
) -> RunResult:
    """Open loop: requests become due at the schedule's times (computed before the run),
    optionally capped at ``max_concurrency`` in flight."""
    s = settings or Settings()
    p = prompts or Prompts(endpoint, nonce=s.nonce)
    texts = _measured_after_warm_up(
        endpoint,
        p,
        "open",
        len(schedule.offsets_s),
        prompt_tokens,
        output_tokens,
        s,
        warmup_requests,
    )
    return _run(
        endpoint,
        texts,
        prompt_tokens,
        output_tokens,
        s,
        concurrency=max_concurrency,
        arrivals_s=schedule.offsets_s,
    )


@dataclass(frozen=True)
class Sustained:
    """Sustained decode at a fixed concurrency, measured over its steady-state window."""

    run: RunResult
    window_ns: tuple[int, int] | None
    steady_output_tok_s: float | None  # output tokens inside the window / window length
    window_fraction: float  # in-flight >= this x peak defines the window


def sustained_decode(
    endpoint: Endpoint,
    *,
    concurrency: int,
    prompt_tokens: int,
    output_tokens: int,
    requests: int | None = None,
    fraction: float = 0.95,
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
) -> Sustained:
    """Keep ``concurrency`` streams busy (``requests`` in all, default 2c) and report the
    output rate inside the window where in-flight >= ``fraction`` x peak."""
    res = concurrency_sweep(
        endpoint,
        levels=[concurrency],
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        requests_per_level=requests or 2 * concurrency,
        warmup_requests=warmup_requests,
        settings=settings,
        prompts=prompts,
    )[concurrency]
    window = steady_state_window(res.records, fraction)
    rate = output_rate_in(res.records, window) if window else None
    return Sustained(res, window, rate, fraction)


def replay(
    endpoint: Endpoint,
    *,
    lengths: Sequence[tuple[int, int]],
    offsets_s: Sequence[float],
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> RunResult:
    """Open loop with a length per request (a trace's replay, `servelab.traces`): request i
    has ``lengths[i]`` = (prompt, output) tokens and becomes due at ``offsets_s[i]``. With
    ``prompt_ids`` (`traces.prompt_token_ids`) request i sends those token ids, prefixes
    shared as the trace shares hash ids, and the run expects cache hits; else every prompt
    is new text."""
    s = settings or Settings()
    p = prompts or Prompts(endpoint, nonce=s.nonce)
    if not lengths or len(lengths) != len(offsets_s):
        raise ClientError(
            f"replay: {len(lengths)} requests but {len(offsets_s)} arrival times; one each"
        )
    texts: Sequence[str | Sequence[int]]
    if prompt_ids is None:
        texts = [p.make(n_in, f"replay{i}", 1)[0] for i, (n_in, _) in enumerate(lengths)]
    elif [len(x) for x in prompt_ids] != [n_in for n_in, _ in lengths]:
        raise ClientError("replay: prompt_ids must hold one prompt of each request's length")
    else:
        texts = prompt_ids
    smallest = min(lengths)
    warm_up(
        endpoint,
        p,
        requests=warmup_requests,
        prompt_tokens=smallest[0],
        output_tokens=smallest[1],
        settings=s,
    )
    before = server_cache_hits(endpoint) if s.check_server_cache else None
    res = run_requests(
        endpoint,
        [
            completion_payload(
                endpoint.model,
                t,
                n_out,
                ignore_eos=s.ignore_eos,
                token_ids=s.token_ids,
                extra=dict(s.extra_body) or None,
            )
            for t, (_, n_out) in zip(texts, lengths, strict=True)
        ],
        concurrency=None,
        arrivals_s=offsets_s,
        prompt_tokens=[n_in for n_in, _ in lengths],
        timeout_s=s.timeout_s,
        first_token_timeout_s=s.first_token_timeout_s,
        workers=s.workers,
        progress=s.progress,
        max_loop_lag_ms=s.max_loop_lag_ms,
        deadline_ns=s.deadline_ns,
        stop_when_stuck=s.stop_when_stuck,
    )
    stop_if_stuck(endpoint, res, s)
    after = server_cache_hits(endpoint) if before is not None else None
    if before is not None and after is not None:
        res = dataclasses.replace(res, server_cache_hits=after - before)
    return dataclasses.replace(res, expect_cached=prompt_ids is not None)


def token_pool(endpoint: Endpoint, timeout_s: float = 60.0) -> list[int]:
    """Ordinary token ids of the served model (`servelab.prompts.WORDS` through the server's
    ``/tokenize``, no special tokens), to draw token-id prompts from."""
    import httpx

    from servelab.engine_traits import traits_of
    from servelab.prompts import WORDS

    text = " " + " ".join(WORDS)
    url = endpoint.base_url.rstrip("/") + "/tokenize"
    if traits_of(endpoint.profile).tokenize == "llama.cpp":
        body: dict[str, Any] = {"content": text, "add_special": False}
    else:
        body = {"model": endpoint.model, "prompt": text, "add_special_tokens": False}
    try:
        r = httpx.post(
            url, json=body, headers=dict(endpoint.headers), timeout=timeout_s, trust_env=False
        )
        tokens = r.json().get("tokens") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        raise ClientError(f"{url}: tokenize request failed: {exc}") from exc
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ClientError(
            f"{url}: HTTP {r.status_code}, no token list ({r.text[:200]!r}); a trace's shared "
            "prefixes need the server's /tokenize (or set workloads.trace.shared_prefixes = false)"
        )
    return sorted(set(tokens))


def cancel_plan(
    requests: int, share: float, after_chunks: int, seed: int = 0
) -> tuple[int | None, ...]:
    """Per request: after how many token chunks the client cancels it (None: never).
    round(share x requests) of them, chosen by a seeded generator, are cancelled.

    >>> cancel_plan(4, 0.5, 3, seed=0)
    (None, None, 3, 3)
    """
    if not 0.0 <= share <= 1.0 or after_chunks < 1:
        raise ClientError(
            f"cancellation: share must be within [0, 1] and after_chunks >= 1 (got {share}, "
            f"{after_chunks}); fix workloads.cancellation"
        )
    k = round(share * requests)
    chosen = set(np.random.default_rng(seed).choice(requests, size=k, replace=False).tolist())
    return tuple(after_chunks if i in chosen else None for i in range(requests))


def cancellation(
    endpoint: Endpoint,
    *,
    requests: int,
    concurrency: int,
    prompt_tokens: int,
    output_tokens: int,
    cancel_after: Sequence[int | None],
    warmup_requests: int = 1,
    settings: Settings | None = None,
    prompts: Prompts | None = None,
) -> RunResult:
    """Closed loop at ``concurrency`` (all due at once) where the client closes request i's
    stream after ``cancel_after[i]`` token chunks (`cancel_plan`), mid-generation."""
    s = settings or Settings()
    p = prompts or Prompts(endpoint, nonce=s.nonce)
    if len(cancel_after) != requests:
        raise ClientError(f"cancellation: {len(cancel_after)} cancel entries for {requests}")
    texts = _measured_after_warm_up(
        endpoint, p, "cancel", requests, prompt_tokens, output_tokens, s, warmup_requests
    )
    return _run(
        endpoint,
        texts,
        prompt_tokens,
        output_tokens,
        s,
        concurrency=concurrency,
        cancel_after=cancel_after,
    )
