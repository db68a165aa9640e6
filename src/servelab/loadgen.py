"""Load generation: many requests against one endpoint, and whether the run counts.
(Over 400 lines: one process or many, the run's watchdog, its stop rules and its validity
checks are one concept, the run.)

`run_requests` sends a list of payloads with a concurrency cap (closed loop) or at
precomputed arrival offsets (open loop, see `servelab.arrivals`), in one process or spread
over worker processes that wait at a ready-then-go barrier for one common start time. A run
can stop early: at a deadline (no request starts after it, none runs past it), and, with
``stop_when_stuck``, once the server is shown stuck (`RunResult.stuck`); the requests it did
not send are records too, with the reason. Each
request goes over the wire through `servelab.client.stream_completion`; a watchdog samples
the event loop's lag and the process's CPU time, so a run whose client could not keep up is
marked invalid (`RunResult.invalid_reasons`).

Public API::

    result = run_requests(endpoint, payloads, concurrency=4)   # sync wrapper
    result = await run_requests_async(endpoint, payloads)      # inside a running loop
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from servelab.client import (
    DEFAULT_TIMEOUT_S,
    RequestRecord,
    api_of,
    http_session,
    requested_output,
    stream_completion,
)
from servelab.errors import ClientError
from servelab.server import Endpoint

#: Event-loop lag (ms, 99th percentile of the watchdog's 5-ms sleeps) above which the
#: client's timestamps are not trusted and the run is marked invalid. On a 2-core machine
#: that also runs a CPU engine, p99 of 5-20 ms is normal (the OS preempts the client).
DEFAULT_MAX_LOOP_LAG_MS = 50.0
#: Share of one core a client process may use during a run; above it the client itself was
#: the bottleneck (it could not keep up) and the run is marked invalid.
MAX_CLIENT_BUSY = 0.9
#: Runs shorter than this are not judged by MAX_CLIENT_BUSY: over a few tens of
#: milliseconds the share is the client's own set-up (seen: 94 % over a 32-ms, 4-request
#: run on a quiet machine), not a sign that it could not keep up. The loop-lag check still
#: applies to them.
MIN_BUSY_RUN_S = 0.5


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
    # The workload shares prompt prefixes on purpose (multi-turn sessions, a trace's shared
    # hash ids): cached prompt tokens are what it measures, not a leak between measurements.
    expect_cached: bool = False
    # The open-loop schedule (one offset in seconds per request index, from the run's start;
    # None: closed loop): what the validity verdict compares the requests' due times with.
    offsets_s: tuple[float, ...] | None = None

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def failed(self) -> tuple[RequestRecord, ...]:
        """Requests that did not succeed, less those the client cancelled on purpose."""
        return tuple(r for r in self.records if not r.success and not r.cancelled)

    @property
    def cancelled(self) -> tuple[RequestRecord, ...]:
        """Requests the client aborted mid-stream on purpose (``cancel_after``)."""
        return tuple(r for r in self.records if r.cancelled)

    def survivors(self) -> RunResult:
        """This run without its cancelled requests: what the users who stayed saw."""
        return dataclasses.replace(self, records=tuple(r for r in self.records if not r.cancelled))

    @property
    def error_rate(self) -> float:
        return len(self.failed) / len(self.records) if self.records else 0.0

    def error_reasons(self, limit: int = 10) -> list[str]:
        return [f"request {r.index}: {r.error}" for r in self.failed[:limit]]

    def stuck(self) -> str | None:
        """Why the server is shown stuck, or None: a request waited its whole first-token
        timeout and, from its send to the end of the run, no request got any token."""
        last_token = max((r.chunk_ns[-1] for r in self.records if r.chunk_ns), default=None)
        for r in self.records:
            if r.first_token_timed_out and (last_token is None or last_token < r.send_ns):
                return (
                    f"request {r.index} got {r.error}, and no request received any token "
                    "after it was sent: the server accepts requests but generates nothing"
                )
        return None

    def length_mismatches(self) -> list[str]:
        return [
            f"request {r.index}: asked for {r.requested_output_tokens} output tokens, "
            f"got {r.output_tokens} ({r.output_tokens_source}; finish {r.finish_reason})"
            for r in self.records
            if r.length_ok is False
        ]

    def cache_hits(self) -> list[str]:
        if self.expect_cached:
            return []
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
            if busy is not None and busy > MAX_CLIENT_BUSY and self.duration_s >= MIN_BUSY_RUN_S
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
    keep_alive: bool = True  # reuse connections (servelab.engine_traits.EngineTraits)
    done_marker: bool = True  # streams end with [DONE] (servelab.engine_traits.EngineTraits)

    def endpoint(self) -> Endpoint:
        return Endpoint(base_url=self.base_url, model=self.model, headers=dict(self.headers))


@dataclass(frozen=True)
class _Job:
    target: _Target
    items: tuple[tuple[int, dict[str, Any], float | None, int | None, int | None], ...]
    concurrency: int | None
    timeout_s: float
    first_token_timeout_s: float | None
    start_at_ns: int  # shared start time: every worker's schedule is relative to it
    lag_interval_ms: float
    worker: int
    progress: bool
    total: int
    deadline_ns: int | None = None  # perf_counter_ns: no request starts or runs past it
    stop_when_stuck: bool = False


def _not_sent(
    job: _Job,
    index: int,
    payload: Mapping[str, Any],
    arrival: int,
    prompt_len: int | None,
    why: str,
) -> RequestRecord:
    """The record of a request that was not sent (or failed inside the client)."""
    return RequestRecord(
        index=index,
        api=api_of(payload),
        arrival_ns=arrival,
        send_ns=time.perf_counter_ns(),
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
        requested_output_tokens=requested_output(payload),
        status_code=None,
        error=why,
        worker=job.worker,
    )


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive before a run are left out of the collector's passes during it.

    A full (generation 2) collection walks every tracked object: in a process that has
    imported vLLM (~400,000 objects) one took 266 ms in the middle of a c128 run against the
    scripted stand-in, and that run's median TTFT read 344 ms where its neighbours read
    66-77 (a 46,700-object process: 28 ms at worst). vLLM's engine freezes its heap for the
    same reason (`gc.freeze`). Left alone when something else already froze it."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def watch_loop(interval_ms: float, samples: list[float], stop: asyncio.Event) -> None:
    """Append how late each `interval_ms` sleep woke up (ms) until `stop` is set; also
    watches `servelab.conversations`' runs."""
    interval_ns = int(interval_ms * 1e6)
    while not stop.is_set():
        t = time.perf_counter_ns()
        await asyncio.sleep(interval_ms / 1000)
        samples.append((time.perf_counter_ns() - t - interval_ns) / 1e6)


def lag_summary(interval_ms: float, samples: list[float], cpu_s: float | None) -> LoopLag:
    """`watch_loop`'s samples as a `LoopLag` (p99 and max, never below 0)."""
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
    stuck: list[str] = []  # why the server is shown stuck (stop_when_stuck)
    last_token = [0]  # perf_counter_ns of the latest token chunk of a finished request

    async def one(
        http: aiohttp.ClientSession,
        index: int,
        payload: dict[str, Any],
        offset_s: float | None,
        prompt_len: int | None,
        cancel_after: int | None,
    ) -> RequestRecord:
        if offset_s:
            due = job.start_at_ns + int(offset_s * 1e9)
            wait = (due - time.perf_counter_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
        arrival = time.perf_counter_ns()
        if sem is None:
            rec = await _send(http, endpoint, payload, index, arrival, prompt_len, cancel_after)
        else:
            async with sem:
                rec = await _send(http, endpoint, payload, index, arrival, prompt_len, cancel_after)
        if pbar is not None:
            pbar.update(1)
        return rec

    async def _send(
        http: aiohttp.ClientSession,
        ep: Endpoint,
        payload: dict[str, Any],
        index: int,
        arrival: int,
        prompt_len: int | None,
        cancel_after: int | None,
    ) -> RequestRecord:
        if stuck:
            return _not_sent(job, index, payload, arrival, prompt_len, f"not sent: {stuck[0]}")
        timeout_s, first_s = job.timeout_s, job.first_token_timeout_s
        cut = False  # the deadline shortened this request's timeouts
        if job.deadline_ns is not None:
            left = (job.deadline_ns - time.perf_counter_ns()) / 1e9
            if left <= 0:
                why = "not sent: the run's deadline had passed"
                return _not_sent(job, index, payload, arrival, prompt_len, why)
            cut = left < (first_s or timeout_s)
            timeout_s = min(timeout_s, left)
            first_s = None if first_s is None else min(first_s, left)
        try:
            rec = await stream_completion(
                http,
                ep,
                payload,
                timeout_s=timeout_s,
                first_token_timeout_s=first_s,
                index=index,
                arrival_ns=arrival,
                requested_prompt_tokens=prompt_len,
                worker=job.worker,
                cancel_after=cancel_after,
                done_marker=job.target.done_marker,
            )
        except Exception as exc:  # a client bug fails this request, not the whole run
            why = f"client error ({type(exc).__name__}: {exc})"
            return _not_sent(job, index, payload, arrival, prompt_len, why)
        if cut and rec.error is not None and rec.error.startswith("timeout"):
            # Cut short by the deadline: no evidence that the server is stuck.
            rec = dataclasses.replace(rec, error=f"the run's deadline passed ({rec.error})")
        if rec.chunk_ns:
            last_token[0] = max(last_token[0], rec.chunk_ns[-1])
        elif job.stop_when_stuck and rec.first_token_timed_out and last_token[0] < rec.send_ns:
            stuck.append(
                f"the server is stuck (request {index} got {rec.error} while no other request "
                "received a token)"
            )
        return rec

    with frozen_heap():
        async with http_session(keep_alive=job.target.keep_alive) as http:
            wait = (job.start_at_ns - time.perf_counter_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            start = max(job.start_at_ns, time.perf_counter_ns())
            job = dataclasses.replace(job, start_at_ns=start)
            cpu0 = time.process_time()
            watchdog = asyncio.create_task(watch_loop(job.lag_interval_ms, samples, stop))
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
    return records, lag_summary(job.lag_interval_ms, samples, cpu), start, end


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
    cancel_after: Sequence[int | None] | None = None,
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
    if cancel_after is not None and len(cancel_after) != n:
        raise ClientError(
            f"run_requests: {len(cancel_after)} cancel_after entries for {n} payloads; give one "
            "each (None: not cancelled)"
        )
    if cancel_after is not None and any(k is not None and k < 1 for k in cancel_after):
        raise ClientError(
            "run_requests: cancel_after must be None or >= 1 token chunk per request "
            f"(got {list(cancel_after)})"
        )


def _items(
    payloads: Sequence[Mapping[str, Any]],
    arrivals_s: Sequence[float] | None,
    prompt_tokens: Sequence[int | None] | None,
    cancel_after: Sequence[int | None] | None = None,
) -> list[tuple[int, dict[str, Any], float | None, int | None, int | None]]:
    return [
        (
            i,
            dict(p),
            None if arrivals_s is None else float(arrivals_s[i]),
            None if prompt_tokens is None else prompt_tokens[i],
            None if cancel_after is None else cancel_after[i],
        )
        for i, p in enumerate(payloads)
    ]


def _target(endpoint: Endpoint) -> _Target:
    from servelab.engine_traits import traits_of

    return _Target(
        endpoint.base_url,
        endpoint.model,
        tuple(dict(endpoint.headers).items()),
        traits_of(endpoint.profile).keep_alive,
        traits_of(endpoint.profile).done_marker,
    )


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
    deadline_ns: int | None = None,
    stop_when_stuck: bool = False,
    cancel_after: Sequence[int | None] | None = None,
    start_at_ns: int = 0,
) -> RunResult:
    """`run_requests` inside an already running event loop (one process, no workers).
    `start_at_ns` (perf_counter_ns, CLOCK_MONOTONIC: one clock for every process of the
    machine): the first request waits for it, after the HTTP client is built, so a run can
    start with another process's."""
    n = len(payloads)
    _check_run_args(n, concurrency, 1, arrivals_s, prompt_tokens, cancel_after)
    job = _Job(
        _target(endpoint),
        tuple(_items(payloads, arrivals_s, prompt_tokens, cancel_after)),
        concurrency,
        timeout_s,
        first_token_timeout_s,
        start_at_ns,
        lag_interval_ms,
        0,
        progress,
        n,
        deadline_ns,
        stop_when_stuck,
    )
    records, lag, start, end = await _run_job(job)
    return RunResult(
        tuple(records),
        start,
        end,
        concurrency,
        1,
        (lag,),
        max_loop_lag_ms,
        offsets_s=None if arrivals_s is None else tuple(float(a) for a in arrivals_s),
    )


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
    deadline_ns: int | None = None,
    stop_when_stuck: bool = False,
    cancel_after: Sequence[int | None] | None = None,
) -> RunResult:
    """Send every payload and return the run's records (a sync wrapper over asyncio).

    ``concurrency`` caps requests in flight (closed loop; ``None`` = no cap). ``arrivals_s``
    (one offset in seconds per payload, from the run's start; see `servelab.arrivals`) makes
    it open loop: each request becomes due at its offset and then waits for a slot.
    ``workers`` > 1 spreads the payloads round-robin over that many processes (each with
    its share of the concurrency cap) when one core cannot keep up. A progress bar appears
    on stderr once a run has taken more than two seconds (``progress=False``: never).

    ``timeout_s`` bounds each request, ``first_token_timeout_s`` (default: ``timeout_s``) its
    wait for a first token. ``deadline_ns`` (a ``perf_counter_ns`` value) ends the run: no
    request starts after it and none runs past it. ``stop_when_stuck``: once a request timed
    out waiting for its first token while no other got a token, the rest are not sent.
    ``cancel_after`` (one entry per payload, None: not cancelled) makes the client close
    request i's stream after that many token chunks (`RunResult.cancelled`; not failures).
    """
    n = len(payloads)
    _check_run_args(n, concurrency, workers, arrivals_s, prompt_tokens, cancel_after)
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
                deadline_ns=deadline_ns,
                stop_when_stuck=stop_when_stuck,
                cancel_after=cancel_after,
            )
        )
    return _run_in_workers(
        _target(endpoint),
        _items(payloads, arrivals_s, prompt_tokens, cancel_after),
        concurrency,
        timeout_s,
        first_token_timeout_s,
        workers,
        lag_interval_ms,
        max_loop_lag_ms,
        progress,
        deadline_ns,
        stop_when_stuck,
    )


def _run_in_workers(
    target: _Target,
    items: list[tuple[int, dict[str, Any], float | None, int | None, int | None]],
    concurrency: int | None,
    timeout_s: float,
    first_token_timeout_s: float | None,
    workers: int,
    lag_interval_ms: float,
    max_loop_lag_ms: float,
    progress: bool,
    deadline_ns: int | None = None,
    stop_when_stuck: bool = False,
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
            deadline_ns,
            stop_when_stuck,
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
        if deadline_ns is not None:
            deadline = min(
                deadline, time.monotonic() + (deadline_ns - time.perf_counter_ns()) / 1e9 + 60
            )
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
        offsets_s=_offsets(items),
    )


def _offsets(
    items: Sequence[tuple[int, dict[str, Any], float | None, int | None, int | None]],
) -> tuple[float, ...] | None:
    """The open-loop schedule of a run's items, by request index (None: closed loop)."""
    due = sorted((index, arrival) for index, _, arrival, _, _ in items)
    if not due or any(a is None for _, a in due):
        return None
    return tuple(float(a) for _, a in due if a is not None)


def _worker_entry(job: _Job, ready: Any, go: Any, start_at: Any, results_q: Any) -> None:
    """Body of one worker process: report ready, wait for the common start, run, send back."""
    try:
        ready.put(job.worker)
        go.wait()
        out = asyncio.run(_run_job(dataclasses.replace(job, start_at_ns=int(start_at.value))))
        results_q.put((job.worker, out))
    except BaseException as exc:  # reported to the parent, which raises ClientError
        results_q.put((job.worker, f"{type(exc).__name__}: {exc}"))
