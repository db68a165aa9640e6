"""Async streaming client: one timestamped `RequestRecord` per request, failures included.

The load path only records timestamps (``time.perf_counter_ns``, a system-wide monotonic
clock on Linux, so records from worker processes share one time base); metrics are computed
afterwards by `servelab.metrics`. Request boundaries follow vLLM's benchmark client:

- ``send_ns`` is read immediately before the POST, after the concurrency slot is taken
  (the wait for a slot is ``send_ns - arrival_ns``, reported apart);
- a *token chunk* is an event whose ``choices`` list is non-empty, even with empty text;
  the first one fixes TTFT; the request ends at the last token chunk (not at the usage
  chunk or ``[DONE]``);
- success = HTTP 200, at least one token chunk, ``[DONE]`` seen, and no error event.

A failed request is data: a record with ``error`` set, never an exception that ends the run.

Public API (used by workloads and by other helpers)::

    async with httpx.AsyncClient(...) as http:
        rec = await stream_completion(http, endpoint, payload, timeout_s=60)
    result = run_requests(endpoint, payloads, concurrency=4)   # sync wrapper
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from servelab.errors import ClientError
from servelab.server import Endpoint
from servelab.sse import SSEDecoder

Api = Literal["completions", "chat"]

#: Default bound on a request's whole life (the profile's limits.request_timeout_s wins).
DEFAULT_TIMEOUT_S = 600.0
#: Event-loop lag (ms, 99th percentile of the watchdog's 5-ms sleeps) above which the
#: client's timestamps are not trusted and the run is marked invalid. On a 2-core machine
#: that also runs a CPU engine, p99 of 5-20 ms is normal (the OS preempts the client).
DEFAULT_MAX_LOOP_LAG_MS = 50.0
#: Share of one core a client process may use during a run; above it the client itself was
#: the bottleneck (it could not keep up) and the run is marked invalid.
MAX_CLIENT_BUSY = 0.9
_ERROR_BODY_LIMIT = 2000


@dataclass(frozen=True)
class RequestRecord:
    """Everything the client saw of one request. Times are ``perf_counter_ns`` values.

    Missing is ``None`` (the server did not report it), never ``0``.
    """

    index: int  # position in the run's payload list
    api: Api
    arrival_ns: int  # when the request became due (schedule), before waiting for a slot
    send_ns: int  # immediately before the POST
    first_token_ns: int | None  # first chunk with non-empty `choices` (vLLM's TTFT)
    first_text_ns: int | None  # first chunk with non-empty text (the lab's TTFT)
    end_ns: int | None  # last token chunk
    done_ns: int | None  # when the stream finished (after usage and [DONE])
    chunk_ns: tuple[int, ...]  # arrival of every token chunk
    chunk_tokens: tuple[int | None, ...]  # tokens per chunk from `token_ids`; None: unknown
    text: str
    finish_reason: str | None
    prompt_tokens: int | None  # usage.prompt_tokens
    completion_tokens: int | None  # usage.completion_tokens
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, when reported
    requested_prompt_tokens: int | None
    requested_output_tokens: int | None  # max_tokens when ignore_eos forces the length
    status_code: int | None
    error: str | None  # None on success; the reason otherwise
    comments: int = 0  # SSE comment lines (keep-alive pings) seen
    worker: int = 0  # worker process that sent it

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def output_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def output_tokens(self) -> int | None:
        """N_i as vLLM counts it: usage.completion_tokens; else token_ids; else None."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        if self.chunk_tokens and all(t is not None for t in self.chunk_tokens):
            return sum(t for t in self.chunk_tokens if t is not None)
        return None

    @property
    def output_tokens_source(self) -> str:
        if self.completion_tokens is not None:
            return "usage"
        if self.chunk_tokens and all(t is not None for t in self.chunk_tokens):
            return "token_ids"
        return "none"

    @property
    def length_ok(self) -> bool | None:
        """Achieved output length equals the forced one; None when no length was forced."""
        if self.requested_output_tokens is None or not self.success:
            return None
        return self.output_tokens == self.requested_output_tokens


# --------------------------------------------------------------------------- payloads


def completion_payload(
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    token_ids: bool = True,
    seed: int | None = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A streaming /v1/completions body with usage requested.

    ``ignore_eos`` also sets ``min_tokens`` so the output length is exactly ``max_tokens``;
    ``token_ids`` asks vLLM for each chunk's token ids (``return_token_ids``), which lets the
    client count tokens per chunk. Both are vLLM extensions: turn them off for other servers.
    """
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        body["seed"] = seed
    if ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    if token_ids:
        body["return_token_ids"] = True
    if extra:
        body.update(extra)
    return body


def chat_payload(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    token_ids: bool = True,
    seed: int | None = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A streaming /v1/chat/completions body (see `completion_payload`)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_completion_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        body["seed"] = seed
    if ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    if token_ids:
        body["return_token_ids"] = True
    if extra:
        body.update(extra)
    return body


def api_of(payload: Mapping[str, Any]) -> Api:
    return "chat" if "messages" in payload else "completions"


def _requested_output(payload: Mapping[str, Any]) -> int | None:
    if not payload.get("ignore_eos"):
        return None
    n = payload.get("max_completion_tokens", payload.get("max_tokens"))
    return int(n) if isinstance(n, int) else None


# --------------------------------------------------------------------------- one request


@dataclass
class _Acc:
    """Mutable accumulator of one request; frozen into a RequestRecord at the end."""

    first_token_ns: int | None = None
    first_text_ns: int | None = None
    done_ns: int | None = None
    chunk_ns: list[int] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    seen_done: bool = False


def _take_event(acc: _Acc, data: str, ts: int) -> bool:
    """Apply one SSE payload; return False when the stream must stop (error)."""
    if data == "[DONE]":
        acc.seen_done = True
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        acc.error = f"malformed chunk (not JSON): {data[:200]!r}"
        return False
    if not isinstance(obj, dict):
        acc.error = f"malformed chunk (not a JSON object): {data[:200]!r}"
        return False
    try:
        return _take_object(acc, obj, data, ts)
    except (TypeError, KeyError, IndexError, AttributeError) as exc:
        # A chunk of the wrong shape (e.g. `choices` not a list of objects) is the server's
        # fault and fails this request only.
        acc.error = f"malformed chunk ({type(exc).__name__}: {exc}): {data[:200]!r}"
        return False


def _take_object(acc: _Acc, obj: dict[str, Any], data: str, ts: int) -> bool:
    if "error" in obj and not obj.get("choices"):
        err = obj["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        acc.error = f"error event in stream: {str(msg)[:500]}"
        return False
    choices = obj.get("choices")
    if choices:
        c0 = choices[0]
        if not isinstance(c0, dict):
            acc.error = f"malformed chunk (choice is not an object): {data[:200]!r}"
            return False
        if acc.first_token_ns is None:
            acc.first_token_ns = ts
        acc.chunk_ns.append(ts)
        delta = c0.get("delta")
        text = c0.get("text") if delta is None else (delta.get("content") or "")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not a string")
        if text:
            acc.text.append(text)
            if acc.first_text_ns is None:
                acc.first_text_ns = ts
        ids = c0.get("token_ids")
        if ids is None and delta is not None:
            ids = delta.get("token_ids")
        acc.chunk_tokens.append(len(ids) if isinstance(ids, list) else None)
        fr = c0.get("finish_reason")
        if fr is not None:
            acc.finish_reason = str(fr)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(pt, int):
            acc.prompt_tokens = pt
        if isinstance(ct, int):
            acc.completion_tokens = ct
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            acc.cached_tokens = details["cached_tokens"]
    return True


async def stream_completion(
    http: httpx.AsyncClient,
    endpoint: Endpoint,
    payload: Mapping[str, Any],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_token_timeout_s: float | None = None,
    index: int = 0,
    arrival_ns: int | None = None,
    requested_prompt_tokens: int | None = None,
    worker: int = 0,
) -> RequestRecord:
    """Send one streaming request and record it. Never raises for a failed request.

    ``payload`` is a body from `completion_payload` or `chat_payload` (``messages`` selects
    the chat API). ``timeout_s`` bounds the whole request, ``first_token_timeout_s`` (default:
    ``timeout_s``) the wait for the first token chunk.
    """
    api = api_of(payload)
    url = endpoint.api_base + ("/chat/completions" if api == "chat" else "/completions")
    acc = _Acc()
    dec = SSEDecoder()
    first_deadline = first_token_timeout_s if first_token_timeout_s is not None else timeout_s
    loop = asyncio.get_running_loop()
    send_ns = time.perf_counter_ns()
    t0 = loop.time()
    try:
        async with asyncio.timeout(min(first_deadline, timeout_s)) as cm:
            async with http.stream(
                "POST", url, json=payload, headers=dict(endpoint.headers)
            ) as response:
                acc.status = response.status_code
                if response.status_code != 200:
                    body = (await response.aread())[:_ERROR_BODY_LIMIT]
                    acc.error = (
                        f"HTTP {response.status_code}: "
                        f"{body.decode('utf-8', 'replace').strip() or response.reason_phrase}"
                    )
                else:
                    ok = True
                    async for raw in response.aiter_raw():
                        ts = time.perf_counter_ns()
                        had_token = acc.first_token_ns is not None
                        for data in dec.feed(raw):
                            if not _take_event(acc, data, ts):
                                ok = False
                                break
                        if not ok:
                            break
                        if not had_token and acc.first_token_ns is not None:
                            cm.reschedule(t0 + timeout_s)
                    if ok:
                        ts = time.perf_counter_ns()
                        for data in dec.close():
                            if not _take_event(acc, data, ts):
                                break
                    acc.done_ns = time.perf_counter_ns()
    except TimeoutError:
        where = "first token" if acc.first_token_ns is None else "end of stream"
        limit = first_deadline if acc.first_token_ns is None else timeout_s
        acc.error = f"timeout: no {where} within {limit:g} s"
    except httpx.HTTPError as exc:
        stage = "before the first token" if acc.first_token_ns is None else "mid-stream"
        acc.error = f"{type(exc).__name__} {stage}: {exc}"
    except OSError as exc:
        acc.error = f"{type(exc).__name__}: {exc}"
    if acc.error is None:
        if acc.first_token_ns is None:
            acc.error = "no token chunk received (stream had no event with choices)"
        elif not acc.seen_done:
            acc.error = "stream ended before [DONE]"
    rp = requested_prompt_tokens
    return RequestRecord(
        index=index,
        api=api,
        arrival_ns=arrival_ns if arrival_ns is not None else send_ns,
        send_ns=send_ns,
        first_token_ns=acc.first_token_ns,
        first_text_ns=acc.first_text_ns,
        end_ns=acc.chunk_ns[-1] if acc.chunk_ns else None,
        done_ns=acc.done_ns,
        chunk_ns=tuple(acc.chunk_ns),
        chunk_tokens=tuple(acc.chunk_tokens),
        text="".join(acc.text),
        finish_reason=acc.finish_reason,
        prompt_tokens=acc.prompt_tokens,
        completion_tokens=acc.completion_tokens,
        cached_tokens=acc.cached_tokens,
        requested_prompt_tokens=rp,
        requested_output_tokens=_requested_output(payload),
        status_code=acc.status,
        error=acc.error,
        comments=dec.comments,
        worker=worker,
    )


# --------------------------------------------------------------------------- runs


def make_http_client(concurrency: int) -> httpx.AsyncClient:
    """An AsyncClient sized for `concurrency` streams; timeouts are the client's own job."""
    n = max(1, concurrency)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=30.0),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        http2=False,
        trust_env=False,
    )


@dataclass(frozen=True)
class LoopLag:
    """How late the client's event loop woke up, sampled every `interval_ms` during a run."""

    interval_ms: float
    samples: int
    p99_ms: float | None
    max_ms: float | None
    cpu_s: float | None = None  # CPU time the client process used during the run


@dataclass(frozen=True)
class RunResult:
    """The records of one run plus what decides whether the run counts.

    ``start_ns``/``end_ns`` bracket the dispatch loop and the completion of every request
    (vLLM's ``duration``); warm-up requests are not in ``records``.
    """

    records: tuple[RequestRecord, ...]
    start_ns: int
    end_ns: int
    concurrency: int | None  # client cap (None: unbounded, open loop)
    workers: int
    loop_lag: tuple[LoopLag, ...]  # one per worker process
    max_loop_lag_ms: float
    # Prompt tokens the server's own counter (vLLM: vllm:prefix_cache_hits_total) says came
    # from its prefix cache during the run; None where not scraped.
    server_cache_hits: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def failed(self) -> tuple[RequestRecord, ...]:
        return tuple(r for r in self.records if not r.success)

    @property
    def error_rate(self) -> float:
        return len(self.failed) / len(self.records) if self.records else 0.0

    def error_reasons(self, limit: int = 10) -> list[str]:
        return [f"request {r.index}: {r.error}" for r in self.failed[:limit]]

    def length_mismatches(self) -> list[str]:
        return [
            f"request {r.index}: asked for {r.requested_output_tokens} output tokens, "
            f"got {r.output_tokens} ({r.output_tokens_source}; finish {r.finish_reason})"
            for r in self.records
            if r.length_ok is False
        ]

    def cache_hits(self) -> list[str]:
        hits = [
            f"request {r.index}: {r.cached_tokens} prompt tokens came from the prefix cache"
            for r in self.records
            if r.cached_tokens
        ]
        if self.server_cache_hits:
            hits.append(
                f"the server counted {self.server_cache_hits:g} prefix-cache hit tokens during "
                "the run (vllm:prefix_cache_hits_total); measured prompts must be new. If other "
                "tests share this server (pytest -n), run the perf tests without -n"
            )
        return hits

    def client_busy(self) -> tuple[float | None, ...]:
        """Per worker: CPU seconds used / run duration (1.0 = one core fully busy)."""
        d = self.duration_s
        return tuple(
            None if lag.cpu_s is None or d <= 0 else lag.cpu_s / d for lag in self.loop_lag
        )

    def client_lagged(self) -> list[str]:
        """Why the client's own timing cannot be trusted: its event loop woke up late
        (p99 above the limit), or a worker used more than 90 % of a core (saturated)."""
        out = [
            f"worker {i}: event-loop lag p99 {lag.p99_ms:.1f} ms > {self.max_loop_lag_ms:g} ms "
            f"(max {lag.max_ms:.1f} ms over {lag.samples} samples): the client could not keep up"
            for i, lag in enumerate(self.loop_lag)
            if lag.p99_ms is not None and lag.p99_ms > self.max_loop_lag_ms
        ]
        out += [
            f"worker {i}: used {busy:.0%} of a core during the run: the client was the "
            "bottleneck (spread the load over more workers)"
            for i, busy in enumerate(self.client_busy())
            if busy is not None and busy > MAX_CLIENT_BUSY
        ]
        return out

    def invalid_reasons(self, max_error_rate: float = 0.0) -> list[str]:
        """Why this run must not be reported (empty: it counts)."""
        reasons: list[str] = []
        if self.error_rate > max_error_rate:
            reasons.append(
                f"error rate {self.error_rate:.1%} > limit {max_error_rate:.1%} "
                f"({len(self.failed)} of {len(self.records)} failed): "
                + "; ".join(self.error_reasons())
            )
        reasons += self.length_mismatches()
        reasons += self.cache_hits()
        reasons += self.client_lagged()
        return reasons


@dataclass(frozen=True)
class _Target:
    """The picklable part of an Endpoint (a Profile holds mapping proxies)."""

    base_url: str
    model: str
    headers: tuple[tuple[str, str], ...]

    def endpoint(self) -> Endpoint:
        return Endpoint(base_url=self.base_url, model=self.model, headers=dict(self.headers))


@dataclass(frozen=True)
class _Job:
    target: _Target
    items: tuple[tuple[int, dict[str, Any], float | None, int | None], ...]
    concurrency: int | None
    timeout_s: float
    first_token_timeout_s: float | None
    start_at_ns: int  # shared start time: every worker's schedule is relative to it
    lag_interval_ms: float
    worker: int
    progress: bool
    total: int


async def _watch_loop(interval_ms: float, samples: list[float], stop: asyncio.Event) -> None:
    interval_ns = int(interval_ms * 1e6)
    while not stop.is_set():
        t = time.perf_counter_ns()
        await asyncio.sleep(interval_ms / 1000)
        samples.append((time.perf_counter_ns() - t - interval_ns) / 1e6)


def _lag_summary(interval_ms: float, samples: list[float], cpu_s: float | None) -> LoopLag:
    if not samples:
        return LoopLag(interval_ms, 0, None, None, cpu_s)
    s = sorted(samples)
    p99 = s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]
    return LoopLag(interval_ms, len(s), max(0.0, p99), max(0.0, s[-1]), cpu_s)


async def _run_job(job: _Job) -> tuple[list[RequestRecord], LoopLag, int, int]:
    """Run one worker's share; return its records, loop lag, start and end times."""
    endpoint = job.target.endpoint()
    cap = job.concurrency
    sem = asyncio.Semaphore(cap) if cap else None
    pbar = _progress(job.total) if job.progress else None
    samples: list[float] = []
    stop = asyncio.Event()

    async def one(
        http: httpx.AsyncClient,
        index: int,
        payload: dict[str, Any],
        offset_s: float | None,
        prompt_len: int | None,
    ) -> RequestRecord:
        if offset_s:
            due = job.start_at_ns + int(offset_s * 1e9)
            wait = (due - time.perf_counter_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
        arrival = time.perf_counter_ns()
        if sem is None:
            rec = await _send(http, endpoint, payload, index, arrival, prompt_len)
        else:
            async with sem:
                rec = await _send(http, endpoint, payload, index, arrival, prompt_len)
        if pbar is not None:
            pbar.update(1)
        return rec

    async def _send(
        http: httpx.AsyncClient,
        ep: Endpoint,
        payload: dict[str, Any],
        index: int,
        arrival: int,
        prompt_len: int | None,
    ) -> RequestRecord:
        try:
            return await stream_completion(
                http,
                ep,
                payload,
                timeout_s=job.timeout_s,
                first_token_timeout_s=job.first_token_timeout_s,
                index=index,
                arrival_ns=arrival,
                requested_prompt_tokens=prompt_len,
                worker=job.worker,
            )
        except Exception as exc:  # a client bug fails this request, not the whole run
            now = time.perf_counter_ns()
            return RequestRecord(
                index=index,
                api=api_of(payload),
                arrival_ns=arrival,
                send_ns=now,
                first_token_ns=None,
                first_text_ns=None,
                end_ns=None,
                done_ns=None,
                chunk_ns=(),
                chunk_tokens=(),
                text="",
                finish_reason=None,
                prompt_tokens=None,
                completion_tokens=None,
                cached_tokens=None,
                requested_prompt_tokens=prompt_len,
                requested_output_tokens=_requested_output(payload),
                status_code=None,
                error=f"client error ({type(exc).__name__}: {exc})",
                worker=job.worker,
            )

    slots = cap or max(1, len(job.items))
    async with make_http_client(slots) as http:
        wait = (job.start_at_ns - time.perf_counter_ns()) / 1e9
        if wait > 0:
            await asyncio.sleep(wait)
        start = max(job.start_at_ns, time.perf_counter_ns())
        job = dataclasses.replace(job, start_at_ns=start)
        cpu0 = time.process_time()
        watchdog = asyncio.create_task(_watch_loop(job.lag_interval_ms, samples, stop))
        try:
            tasks = [asyncio.create_task(one(http, *item)) for item in job.items]
            records = list(await asyncio.gather(*tasks))
        finally:
            stop.set()
            await watchdog
            if pbar is not None:
                pbar.close()
        cpu = time.process_time() - cpu0
    end = time.perf_counter_ns()
    return records, _lag_summary(job.lag_interval_ms, samples, cpu), start, end


def _progress(total: int) -> Any:
    from tqdm import tqdm

    # Shown only once the run has taken more than a couple of seconds.
    return tqdm(total=total, unit="req", file=sys.stderr, delay=2.0, leave=False)


def _check_run_args(
    n: int,
    concurrency: int | None,
    workers: int,
    arrivals_s: Sequence[float] | None,
    prompt_tokens: Sequence[int | None] | None,
) -> None:
    if n == 0:
        raise ClientError("run_requests: no payloads given; a run needs at least one request")
    if concurrency is not None and concurrency < 1:
        raise ClientError(f"run_requests: concurrency must be >= 1 or None (got {concurrency})")
    if workers < 1:
        raise ClientError(f"run_requests: workers must be >= 1 (got {workers})")
    if arrivals_s is not None and len(arrivals_s) != n:
        raise ClientError(
            f"run_requests: {len(arrivals_s)} arrival times for {n} payloads; give one each"
        )
    if prompt_tokens is not None and len(prompt_tokens) != n:
        raise ClientError(
            f"run_requests: {len(prompt_tokens)} prompt lengths for {n} payloads; give one each"
        )


def _items(
    payloads: Sequence[Mapping[str, Any]],
    arrivals_s: Sequence[float] | None,
    prompt_tokens: Sequence[int | None] | None,
) -> list[tuple[int, dict[str, Any], float | None, int | None]]:
    return [
        (
            i,
            dict(p),
            None if arrivals_s is None else float(arrivals_s[i]),
            None if prompt_tokens is None else prompt_tokens[i],
        )
        for i, p in enumerate(payloads)
    ]


def _target(endpoint: Endpoint) -> _Target:
    return _Target(endpoint.base_url, endpoint.model, tuple(dict(endpoint.headers).items()))


async def run_requests_async(
    endpoint: Endpoint,
    payloads: Sequence[Mapping[str, Any]],
    *,
    concurrency: int | None = 1,
    arrivals_s: Sequence[float] | None = None,
    prompt_tokens: Sequence[int | None] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_token_timeout_s: float | None = None,
    progress: bool = False,
    max_loop_lag_ms: float = DEFAULT_MAX_LOOP_LAG_MS,
    lag_interval_ms: float = 5.0,
) -> RunResult:
    """`run_requests` inside an already running event loop (one process, no workers)."""
    n = len(payloads)
    _check_run_args(n, concurrency, 1, arrivals_s, prompt_tokens)
    job = _Job(
        _target(endpoint),
        tuple(_items(payloads, arrivals_s, prompt_tokens)),
        concurrency,
        timeout_s,
        first_token_timeout_s,
        0,
        lag_interval_ms,
        0,
        progress,
        n,
    )
    records, lag, start, end = await _run_job(job)
    return RunResult(tuple(records), start, end, concurrency, 1, (lag,), max_loop_lag_ms)


def run_requests(
    endpoint: Endpoint,
    payloads: Sequence[Mapping[str, Any]],
    *,
    concurrency: int | None = 1,
    arrivals_s: Sequence[float] | None = None,
    prompt_tokens: Sequence[int | None] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_token_timeout_s: float | None = None,
    workers: int = 1,
    progress: bool = True,
    max_loop_lag_ms: float = DEFAULT_MAX_LOOP_LAG_MS,
    lag_interval_ms: float = 5.0,
) -> RunResult:
    """Send every payload and return the run's records (a sync wrapper over asyncio).

    ``concurrency`` caps requests in flight (closed loop; ``None`` = no cap). ``arrivals_s``
    (one offset in seconds per payload, from the run's start; see `servelab.arrivals`) makes
    it open loop: each request becomes due at its offset and then waits for a slot.
    ``workers`` > 1 spreads the payloads round-robin over that many processes (each with
    its share of the concurrency cap) when one core cannot keep up. A progress bar appears
    on stderr once a run has taken more than two seconds (``progress=False``: never).
    """
    n = len(payloads)
    _check_run_args(n, concurrency, workers, arrivals_s, prompt_tokens)
    workers = min(workers, n)
    if workers == 1:
        return asyncio.run(
            run_requests_async(
                endpoint,
                payloads,
                concurrency=concurrency,
                arrivals_s=arrivals_s,
                prompt_tokens=prompt_tokens,
                timeout_s=timeout_s,
                first_token_timeout_s=first_token_timeout_s,
                progress=progress,
                max_loop_lag_ms=max_loop_lag_ms,
                lag_interval_ms=lag_interval_ms,
            )
        )
    return _run_in_workers(
        _target(endpoint),
        _items(payloads, arrivals_s, prompt_tokens),
        concurrency,
        timeout_s,
        first_token_timeout_s,
        workers,
        lag_interval_ms,
        max_loop_lag_ms,
        progress,
    )


def _run_in_workers(
    target: _Target,
    items: list[tuple[int, dict[str, Any], float | None, int | None]],
    concurrency: int | None,
    timeout_s: float,
    first_token_timeout_s: float | None,
    workers: int,
    lag_interval_ms: float,
    max_loop_lag_ms: float,
    progress: bool,
) -> RunResult:
    shards = [items[w::workers] for w in range(workers)]
    caps: list[int | None]
    if concurrency is None:
        caps = [None] * workers
    else:
        if concurrency < workers:
            raise ClientError(
                f"run_requests: concurrency {concurrency} < workers {workers}; "
                "use at most one worker per concurrent request"
            )
        caps = [
            concurrency // workers + (1 if w < concurrency % workers else 0) for w in range(workers)
        ]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    results_q = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("q", 0)
    jobs = [
        _Job(
            target,
            tuple(shards[w]),
            caps[w],
            timeout_s,
            first_token_timeout_s,
            0,
            lag_interval_ms,
            w,
            progress and w == 0,
            len(shards[w]),
        )
        for w in range(workers)
    ]
    procs = [
        ctx.Process(target=_worker_entry, args=(job, ready, go, start_at, results_q), daemon=True)
        for job in jobs
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:  # every worker has imported everything and built its client
            ready.get(timeout=120)
        start_at.value = time.perf_counter_ns() + 20_000_000
        go.set()
        results: dict[int, tuple[list[RequestRecord], LoopLag, int, int]] = {}
        deadline = time.monotonic() + timeout_s * (1 + len(items)) + 120
        while len(results) < workers:
            w, payload = results_q.get(timeout=max(1.0, deadline - time.monotonic()))
            if isinstance(payload, str):
                raise ClientError(f"run_requests: worker {w} crashed: {payload}")
            results[w] = payload
    except Exception as exc:
        if isinstance(exc, ClientError):
            raise
        raise ClientError(f"run_requests: worker processes failed: {exc!r}") from exc
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    start = int(start_at.value)
    records = sorted((r for recs, _, _, _ in results.values() for r in recs), key=lambda r: r.index)
    end = max(e for _, _, _, e in results.values())
    return RunResult(
        tuple(records),
        start,
        end,
        concurrency,
        workers,
        tuple(results[w][1] for w in range(workers)),
        max_loop_lag_ms,
    )


def _worker_entry(job: _Job, ready: Any, go: Any, start_at: Any, results_q: Any) -> None:
    """Body of one worker process: report ready, wait for the common start, run, send back."""
    try:
        ready.put(job.worker)
        go.wait()
        out = asyncio.run(_run_job(dataclasses.replace(job, start_at_ns=int(start_at.value))))
        results_q.put((job.worker, out))
    except BaseException as exc:  # reported to the parent, which raises ClientError
        results_q.put((job.worker, f"{type(exc).__name__}: {exc}"))
