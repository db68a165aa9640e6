"""Async streaming client: one timestamped `RequestRecord` per request, failures included.
(Over 400 lines: the record, its payloads and the one request that fills it belong together.)

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

    async with http_session() as http:
        rec = await stream_completion(http, endpoint, payload, timeout_s=60)

Running many requests (concurrency, arrival schedules, worker processes) is
`servelab.loadgen`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from servelab.errors import ClientError
from servelab.server import Endpoint
from servelab.sse import SSEDecoder

Api = Literal["completions", "chat"]

#: Default bound on a request's whole life (the profile's limits.request_timeout_s wins).
DEFAULT_TIMEOUT_S = 600.0
#: How the error of a request that timed out waiting for its first token begins.
FIRST_TOKEN_TIMEOUT = "timeout: no first token"
#: How the error of a request the client aborted on purpose (``cancel_after``) begins.
CANCELLED = "cancelled by the client"
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
    def cancelled(self) -> bool:
        """The client aborted this stream on purpose (`stream_completion`'s ``cancel_after``):
        neither a success nor a failure of the server."""
        return self.error is not None and self.error.startswith(CANCELLED)

    @property
    def first_token_timed_out(self) -> bool:
        return self.error is not None and self.error.startswith(FIRST_TOKEN_TIMEOUT)

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
    prompt: str | Sequence[int],
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    token_ids: bool = True,
    seed: int | None = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A streaming /v1/completions body with usage requested. ``prompt`` is text or a list
    of token ids (exact lengths and exactly shared prefixes, as in a trace's replay).

    ``ignore_eos`` also sets ``min_tokens`` so the output length is exactly ``max_tokens``;
    ``token_ids`` asks vLLM for each chunk's token ids (``return_token_ids``), which lets the
    client count tokens per chunk. Both are vLLM extensions: turn them off for other servers.
    """
    return _streaming_body(
        {
            "model": model,
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "max_tokens": max_tokens,
        },
        max_tokens,
        ignore_eos=ignore_eos,
        token_ids=token_ids,
        seed=seed,
        extra=extra,
    )


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
    return _streaming_body(
        {
            "model": model,
            "messages": [dict(m) for m in messages],
            "max_completion_tokens": max_tokens,
        },
        max_tokens,
        ignore_eos=ignore_eos,
        token_ids=token_ids,
        seed=seed,
        extra=extra,
    )


def _streaming_body(
    body: dict[str, Any],
    max_tokens: int,
    *,
    ignore_eos: bool,
    token_ids: bool,
    seed: int | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Greedy sampling, streaming with usage, and the optional vLLM extensions."""
    body.update(
        {
            "temperature": 0.0,
            "top_p": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
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


def requested_output(payload: Mapping[str, Any]) -> int | None:
    """The output length ``payload`` forces (``ignore_eos`` with a max); None otherwise."""
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
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    payload: Mapping[str, Any],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_token_timeout_s: float | None = None,
    index: int = 0,
    arrival_ns: int | None = None,
    requested_prompt_tokens: int | None = None,
    worker: int = 0,
    cancel_after: int | None = None,
    done_marker: bool = True,
) -> RequestRecord:
    """Send one streaming request and record it. Never raises for a failed request.

    ``payload`` is a body from `completion_payload` or `chat_payload` (``messages`` selects
    the chat API). ``timeout_s`` bounds the whole request, ``first_token_timeout_s`` (default:
    ``timeout_s``) the wait for the first token chunk. ``cancel_after`` (k >= 1): the client
    closes the stream once k token chunks have come, as a user who stops reading would; the
    record's error then begins with `CANCELLED` (`RequestRecord.cancelled`).
    ``done_marker=False``: the engine sends no ``data: [DONE]`` (`EngineTraits.done_marker`);
    its stream is complete when the body ends after a chunk with a finish_reason.
    """
    if cancel_after is not None and cancel_after < 1:
        raise ClientError(
            f"stream_completion: cancel_after must be >= 1 token chunk (got {cancel_after})"
        )
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
            async with http.post(url, json=payload, headers=dict(endpoint.headers)) as response:
                acc.status = response.status
                if response.status != 200:
                    body = (await response.read())[:_ERROR_BODY_LIMIT]
                    acc.error = (
                        f"HTTP {response.status}: "
                        f"{body.decode('utf-8', 'replace').strip() or response.reason}"
                    )
                else:
                    ok = True
                    async for raw in response.content.iter_any():
                        ts = time.perf_counter_ns()
                        had_token = acc.first_token_ns is not None
                        for data in dec.feed(raw):
                            if not _take_event(acc, data, ts):
                                ok = False
                                break
                            if cancel_after is not None and len(acc.chunk_ns) >= cancel_after:
                                # Leaving the stream unread closes its connection: the server
                                # sees the client go, as it would a user's closed tab.
                                acc.error = f"{CANCELLED} after {len(acc.chunk_ns)} token chunks"
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
        if acc.first_token_ns is None:
            limit = min(first_deadline, timeout_s)
            acc.error = f"{FIRST_TOKEN_TIMEOUT} within {limit:g} s"
        else:
            acc.error = f"timeout: no end of stream within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        stage = "before the first token" if acc.first_token_ns is None else "mid-stream"
        acc.error = f"{type(exc).__name__} {stage}: {_cause(exc)}"
    except OSError as exc:
        acc.error = f"{type(exc).__name__}: {exc}"
    if acc.error is None:
        if acc.first_token_ns is None:
            acc.error = "no token chunk received (stream had no event with choices)"
        elif not acc.seen_done and (done_marker or acc.finish_reason is None):
            acc.error = (
                "stream ended before [DONE]"
                if done_marker
                else "stream ended without a finish_reason (this engine sends no [DONE])"
            )
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
        requested_output_tokens=requested_output(payload),
        status_code=acc.status,
        error=acc.error,
        comments=dec.comments,
        worker=worker,
    )


def _cause(exc: BaseException) -> str:
    """The first non-empty message down the exception chain (an HTTP library's error may
    carry none, where the ConnectionResetError under it says what happened)."""
    seen: BaseException | None = exc
    walked: set[int] = set()  # a chain set by hand can loop
    while seen is not None and id(seen) not in walked:
        if str(seen):
            return str(seen) if seen is exc else f"{type(seen).__name__}: {seen}"
        walked.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return "no detail given"


# --------------------------------------------------------------------------- http client


@contextlib.asynccontextmanager
async def http_session(*, keep_alive: bool = True) -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP client of one run: an aiohttp session with no connection limit (the run's
    own concurrency is the limit); timeouts are the client's own job (`stream_completion`).

    aiohttp, as vLLM's benchmark client uses: servelab first streamed with httpx, whose
    connection pool re-examines every queued request against every connection at each
    request's start and end (O(N²)). With 32 streams on a 2-core host that took 3.8 of 5.8 s
    of the client's time, and requests reached a scripted server 30-95 ms after their
    ``send_ns`` (vLLM's client: ~5 ms), which servelab counted in TTFT.

    ``keep_alive=False`` closes each connection after its request, for a server that closes a
    kept connection after a streamed response without saying so (llama.cpp's, see
    `servelab.engine_traits`)."""
    if keep_alive:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    else:  # aiohttp refuses a keep-alive timeout together with force_close
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0),
        trust_env=False,
        auto_decompress=False,
    ) as session:
        yield session
