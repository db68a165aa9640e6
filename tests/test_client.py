"""The streaming client against typed fakes.

Stand-ins, and why they are honest here: the point of these tests is the client's own
behaviour on bad input (HTTP errors, a reset mid-stream, malformed chunks, no first token
before the timeout), which a real vLLM server cannot be made to produce on demand. The
fakes speak the same wire format (HTTP/1.1 chunked SSE, OpenAI chunk objects); no figure is
ever measured against them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from servelab import client
from servelab.client import RequestRecord, completion_payload, run_requests, stream_completion
from servelab.errors import ClientError
from servelab.server import Endpoint

EP = Endpoint(base_url="http://fake", model="m")


def chunk(text: str, **extra: Any) -> bytes:
    body = {
        "id": "c",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": None, **extra}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage(prompt: int, completion: int, cached: int | None = None) -> bytes:
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return b"data: " + json.dumps({"choices": [], "usage": u}).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Parts(httpx.AsyncByteStream):
    """Yield byte parts with optional pauses; an Exception part is raised (a reset)."""

    def __init__(self, parts: list[bytes | float | Exception]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for p in self.parts:
            if isinstance(p, float):
                await asyncio.sleep(p)
            elif isinstance(p, Exception):
                raise p
            else:
                yield p


def fake(parts: list[bytes | float | Exception], status: int = 200) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, stream=Parts(parts))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def one(
    parts: list[bytes | float | Exception], status: int = 200, **kw: Any
) -> RequestRecord:
    payload = kw.pop("payload", completion_payload("m", "hi", 2))
    async with fake(parts, status) as http:
        return await stream_completion(http, EP, payload, **kw)


def test_happy_path_records_everything() -> None:
    parts: list[bytes | float | Exception] = [
        b": keep-alive\n\n",
        chunk("Hel", token_ids=[1]),
        0.01,
        chunk("lo", token_ids=[2]),
        b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n',
        usage(5, 2, cached=0),
        DONE,
    ]
    r = asyncio.run(one(parts, requested_prompt_tokens=5))
    assert r.success and r.error is None and r.status_code == 200
    assert r.text == "Hello" and r.finish_reason == "length"
    assert (r.prompt_tokens, r.completion_tokens, r.cached_tokens) == (5, 2, 0)
    assert len(r.chunk_ns) == 3  # the empty-text chunk still counts (it has choices)
    assert r.chunk_tokens == (1, 1, None)
    assert r.first_token_ns == r.chunk_ns[0] and r.end_ns == r.chunk_ns[-1]
    assert r.send_ns <= r.first_token_ns < r.chunk_ns[1] - 5_000_000  # the 10 ms pause
    assert r.done_ns is not None and r.done_ns >= r.end_ns
    assert r.comments == 1
    assert r.output_tokens == 2 and r.output_tokens_source == "usage"
    assert r.length_ok is True  # ignore_eos asked for max_tokens=2
    import hashlib

    assert r.output_sha256 == hashlib.sha256(b"Hello").hexdigest()


def test_chat_deltas_and_role_chunk() -> None:
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
    text = b'data: {"choices": [{"index": 0, "delta": {"content": "Paris"}, "token_ids": [9]}]}\n\n'
    payload = client.chat_payload("m", [{"role": "user", "content": "q"}], 1)
    r = asyncio.run(one([role, 0.01, text, usage(3, 1), DONE], payload=payload))
    assert r.api == "chat" and r.success and r.text == "Paris"
    assert r.first_token_ns == r.chunk_ns[0]  # vLLM's TTFT: the role chunk
    assert r.first_text_ns == r.chunk_ns[1]  # the lab's TTFT: first non-empty text
    assert r.length_ok is True


def test_http_error_is_a_failed_record() -> None:
    r = asyncio.run(one([b'{"error": "overloaded"}'], status=503))
    assert not r.success and r.status_code == 503
    assert r.error is not None and r.error.startswith("HTTP 503") and "overloaded" in r.error
    assert r.chunk_ns == () and r.length_ok is None


def test_reset_mid_stream_keeps_what_arrived() -> None:
    parts: list[bytes | float | Exception] = [
        chunk("a"),
        httpx.RemoteProtocolError("peer closed connection"),
    ]
    r = asyncio.run(one(parts))
    assert not r.success and r.error is not None
    assert "mid-stream" in r.error and "RemoteProtocolError" in r.error
    assert len(r.chunk_ns) == 1 and r.text == "a"


def test_malformed_chunk() -> None:
    r = asyncio.run(one([chunk("a"), b"data: {not json\n\n", chunk("b"), DONE]))
    assert not r.success and r.error is not None and r.error.startswith("malformed chunk")
    assert r.text == "a"  # nothing after the bad chunk is taken


def test_error_event_in_stream() -> None:
    err = b'data: {"error": {"message": "engine died", "code": 500}}\n\n'
    r = asyncio.run(one([chunk("a"), err, DONE]))
    assert r.error == "error event in stream: engine died"


def test_no_first_token_before_timeout() -> None:
    r = asyncio.run(one([b": ping\n\n", 5.0, chunk("late"), DONE], first_token_timeout_s=0.1))
    assert not r.success and r.error == "timeout: no first token within 0.1 s"


def test_total_timeout_after_first_token() -> None:
    r = asyncio.run(one([chunk("a"), 5.0, DONE], timeout_s=0.2, first_token_timeout_s=0.1))
    assert r.error == "timeout: no end of stream within 0.2 s"
    assert len(r.chunk_ns) == 1


def test_stream_without_done_or_tokens_fails() -> None:
    assert asyncio.run(one([chunk("a"), usage(1, 1)])).error == "stream ended before [DONE]"
    r = asyncio.run(one([usage(1, 0), DONE]))
    assert r.error is not None and r.error.startswith("no token chunk")


def test_unterminated_final_event_is_accepted() -> None:
    r = asyncio.run(one([chunk("a"), b"data: [DONE]"]))
    assert r.success


def test_payload_builders() -> None:
    p = completion_payload("m", "x", 8)
    assert p["stream"] is True and p["stream_options"] == {"include_usage": True}
    assert p["ignore_eos"] is True and p["min_tokens"] == p["max_tokens"] == 8
    q = completion_payload("m", "x", 8, ignore_eos=False, token_ids=False, seed=None)
    assert "ignore_eos" not in q and "return_token_ids" not in q and "seed" not in q
    c = client.chat_payload("m", [{"role": "user", "content": "x"}], 4)
    assert c["max_completion_tokens"] == 4 and client.api_of(c) == "chat"


# --------------------------------------------------------------------------- a local server


class FaultServer:
    """A tiny HTTP/1.1 SSE server on localhost. The prompt picks the behaviour:
    ``ok``, ``short`` (one token fewer than asked), ``500``, ``reset``, ``malformed``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = json.loads(await reader.readexactly(length))
                if not await self._answer(body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, body: dict[str, Any], w: asyncio.StreamWriter) -> bool:
        mode = body["prompt"]
        n = int(body["max_tokens"])
        if mode == "500":
            msg = b'{"error": "boom"}'
            w.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s"
                % (len(msg), msg)
            )
            await w.drain()
            return True
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def send(data: bytes) -> None:
            w.write(b"%x\r\n%s\r\n" % (len(data), data))

        produced = n - 1 if mode == "short" else n
        for i in range(produced):
            send(chunk(f"t{i} ", token_ids=[i]))
            if mode == "reset" and i == 1:
                await w.drain()
                w.transport.abort()  # RST, mid-stream
                return False
            if mode == "malformed" and i == 0:
                send(b"data: {oops\n\n")
            await asyncio.sleep(0.001)
        send(usage(4, produced))
        send(DONE)
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True


@pytest.fixture(scope="module")
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def test_run_keeps_good_results_and_lists_failures(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    modes = ["ok", "500", "ok", "reset", "malformed", "short", "ok"]
    payloads = [completion_payload("m", m, 4) for m in modes]
    res = run_requests(ep, payloads, concurrency=3, prompt_tokens=[4] * len(modes), progress=False)
    by_mode = dict(zip(modes, res.records, strict=False))
    assert [r.index for r in res.records] == list(range(len(modes)))
    assert all(r.success for m, r in zip(modes, res.records, strict=True) if m in ("ok", "short"))
    assert res.records[1].error is not None and res.records[1].error.startswith("HTTP 500")
    assert res.records[3].error is not None and "mid-stream" in res.records[3].error
    assert by_mode["malformed"].error is not None
    assert len(res.failed) == 3 and res.error_rate == pytest.approx(3 / 7)
    assert res.records[0].output_tokens == 4 and res.records[0].length_ok
    assert res.records[5].length_ok is False
    reasons = res.invalid_reasons(max_error_rate=0.0)
    assert any("error rate 42.9% > limit 0.0%" in r for r in reasons)
    assert any("request 5: asked for 4 output tokens, got 3" in r for r in reasons)
    assert any("request 3:" in r for r in reasons)
    assert res.duration_s > 0 and res.loop_lag[0].samples > 0


def test_error_rate_within_limit_still_reports_length_mismatch(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    res = run_requests(ep, [completion_payload("m", "ok", 3)] * 3, concurrency=2, progress=False)
    assert res.invalid_reasons() == []
    res = run_requests(
        ep, [completion_payload("m", "500", 3), completion_payload("m", "ok", 3)], progress=False
    )
    assert res.invalid_reasons(max_error_rate=0.5) == []
    assert res.invalid_reasons(max_error_rate=0.4) != []


def test_open_loop_arrivals_are_respected(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    offsets = [0.0, 0.15, 0.3]
    res = run_requests(
        ep,
        [completion_payload("m", "ok", 2)] * 3,
        concurrency=None,
        arrivals_s=offsets,
        progress=False,
    )
    for r, off in zip(res.records, offsets, strict=True):
        assert (r.arrival_ns - res.start_ns) / 1e9 == pytest.approx(off, abs=0.05)
        assert r.send_ns >= r.arrival_ns


def test_closed_loop_queues_behind_the_cap(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    res = run_requests(ep, [completion_payload("m", "ok", 20)] * 4, concurrency=1, progress=False)
    spans = sorted((r.send_ns, r.done_ns or 0) for r in res.records)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # one at a time
    assert max(r.send_ns - r.arrival_ns for r in res.records) > 10_000_000


def test_worker_processes_share_the_run(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    res = run_requests(
        ep, [completion_payload("m", "ok", 3)] * 6, concurrency=4, workers=2, progress=False
    )
    assert res.workers == 2 and len(res.loop_lag) == 2
    assert [r.index for r in res.records] == list(range(6))
    assert {r.worker for r in res.records} == {0, 1}
    assert all(r.success for r in res.records)
    assert all(res.start_ns <= r.send_ns <= res.end_ns for r in res.records)


def test_bad_arguments_raise_client_error() -> None:
    with pytest.raises(ClientError, match="no payloads"):
        run_requests(EP, [])
    with pytest.raises(ClientError, match="concurrency"):
        run_requests(EP, [{}], concurrency=0)
    with pytest.raises(ClientError, match="arrival"):
        run_requests(EP, [{}], arrivals_s=[0.0, 1.0])
    with pytest.raises(ClientError, match="workers"):
        run_requests(EP, [{}, {}], workers=0)


def test_loop_lag_marks_run_invalid() -> None:
    lag = client.LoopLag(interval_ms=5.0, samples=10, p99_ms=80.0, max_ms=90.0, cpu_s=0.1)
    res = client.RunResult((), 0, 10**9, 1, 1, (lag,), max_loop_lag_ms=20.0)
    assert any("could not keep up" in r for r in res.invalid_reasons())
    calm = client.LoopLag(interval_ms=5.0, samples=10, p99_ms=3.0, max_ms=9.0, cpu_s=0.1)
    assert client.RunResult((), 0, 10**9, 1, 1, (calm,), 20.0).invalid_reasons() == []


def test_saturated_client_marks_run_invalid() -> None:
    busy = client.LoopLag(interval_ms=5.0, samples=10, p99_ms=3.0, max_ms=9.0, cpu_s=0.95)
    res = client.RunResult((), 0, 10**9, 1, 1, (busy,), max_loop_lag_ms=20.0)
    assert res.client_busy()[0] == pytest.approx(0.95)
    assert any("the client was the bottleneck" in r for r in res.invalid_reasons())


def test_prefix_cache_hits_make_a_run_invalid() -> None:
    """Seen on the real CPU server with --enable-prompt-tokens-details: a repeated 300-token
    prompt came back with cached_tokens = 256; both signals must invalidate the run."""
    parts: list[bytes | float | Exception] = [chunk("a"), chunk("b"), usage(300, 2, 256), DONE]
    rec = asyncio.run(one(parts))
    assert rec.success and rec.cached_tokens == 256
    res = client.RunResult((rec,), 0, 10**9, 1, 1, (), max_loop_lag_ms=50.0)
    assert res.invalid_reasons() == ["request 0: 256 prompt tokens came from the prefix cache"]
    fresh = dataclasses.replace(rec, cached_tokens=0)
    res = client.RunResult((fresh,), 0, 10**9, 1, 1, (), 50.0, server_cache_hits=16.0)
    assert len(res.invalid_reasons()) == 1
    assert "server counted 16 prefix-cache hit tokens" in res.invalid_reasons()[0]
    assert client.RunResult((fresh,), 0, 10**9, 1, 1, (), 50.0, 0.0).invalid_reasons() == []


@pytest.mark.parametrize(
    "bad",
    [
        b'data: {"choices": {"0": 1}}\n\n',  # choices not a list
        b'data: {"choices": [{"index": 0, "delta": ["x"]}]}\n\n',  # delta not an object
        b'data: {"choices": [{"index": 0, "text": 5}]}\n\n',  # text not a string
        b"data: [1, 2]\n\n",  # not an object
    ],
)
def test_chunks_of_the_wrong_shape_fail_only_that_request(bad: bytes) -> None:
    r = asyncio.run(one([chunk("a"), bad, DONE]))
    assert not r.success and r.error is not None and r.error.startswith("malformed chunk")


def test_unexpected_client_error_fails_one_request_only(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    bad = {**completion_payload("m", "ok", 2), "unserializable": {1, 2}}  # a set is not JSON
    res = run_requests(ep, [completion_payload("m", "ok", 2), bad], progress=False)
    assert res.records[0].success
    err = res.records[1].error
    assert err is not None and err.startswith("client error (TypeError")
