"""Load generation (`servelab.loadgen`) against a local fault-injecting server.

Stand-in, and why it is honest here: the point is the run machinery's own behaviour
(concurrency cap, arrival schedule, worker processes, failed requests kept as data, the
checks that invalidate a run), which a real vLLM server cannot be made to fail on demand.
The server speaks the same wire format (HTTP/1.1 chunked SSE, OpenAI chunk objects); no
figure is ever measured against it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from servelab.client import RequestRecord, completion_payload, http_session, stream_completion
from servelab.errors import ClientError
from servelab.loadgen import LoopLag, RunResult, run_requests
from servelab.server import Endpoint
from tests.fakes.sse import DONE, ThreadedAsyncServer, chunk, parts_server, usage

EP = Endpoint(base_url="http://fake", model="m")


async def record(parts: list[bytes]) -> RequestRecord:
    """One request answered by a fixed SSE body (no pauses)."""

    async with (
        parts_server([b"".join(parts)]) as base,
        http_session() as http,
    ):
        return await stream_completion(http, Endpoint(base, "m"), completion_payload("m", "hi", 2))


class FaultServer(ThreadedAsyncServer):
    """A tiny HTTP/1.1 SSE server on localhost. The prompt picks the behaviour:
    ``ok``, ``short`` (one token fewer than asked), ``500``, ``reset``, ``malformed``,
    ``hang`` (headers, then never a first token)."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = json.loads(await reader.readexactly(length))
                if not await self._answer(body, writer, reader):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, body: dict[str, Any], w: asyncio.StreamWriter, reader: asyncio.StreamReader
    ) -> bool:
        mode = body["prompt"]
        n = int(body["max_tokens"])
        if mode == "hang":  # accepted, never a first token
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            await w.drain()
            await reader.read()  # until the client gives up and closes the connection
            return False
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
    assert res.offsets_s == tuple(offsets)  # the schedule the validity verdict checks
    two = run_requests(
        ep,
        [completion_payload("m", "ok", 2)] * 3,
        concurrency=None,
        arrivals_s=[0.3, 0.0, 0.15],
        workers=2,
        progress=False,
    )
    assert two.offsets_s == (0.3, 0.0, 0.15)  # by request index, across worker processes
    closed = run_requests(ep, [completion_payload("m", "ok", 2)], progress=False)
    assert closed.offsets_s is None


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
    lag = LoopLag(interval_ms=5.0, samples=10, p99_ms=80.0, max_ms=90.0, cpu_s=0.1)
    res = RunResult((), 0, 10**9, 1, 1, (lag,), max_loop_lag_ms=20.0)
    assert any("could not keep up" in r for r in res.invalid_reasons())
    calm = LoopLag(interval_ms=5.0, samples=10, p99_ms=3.0, max_ms=9.0, cpu_s=0.1)
    assert RunResult((), 0, 10**9, 1, 1, (calm,), 20.0).invalid_reasons() == []


def test_saturated_client_marks_run_invalid() -> None:
    busy = LoopLag(interval_ms=5.0, samples=10, p99_ms=3.0, max_ms=9.0, cpu_s=0.95)
    res = RunResult((), 0, 10**9, 1, 1, (busy,), max_loop_lag_ms=20.0)
    assert res.client_busy()[0] == pytest.approx(0.95)
    assert any("the client was the bottleneck" in r for r in res.invalid_reasons())
    # The same share over a 32-ms run is the client's set-up, not a bottleneck.
    short = LoopLag(interval_ms=5.0, samples=3, p99_ms=3.0, max_ms=4.0, cpu_s=0.030)
    res = RunResult((), 0, 32 * 10**6, 1, 1, (short,), max_loop_lag_ms=20.0)
    assert res.client_busy()[0] == pytest.approx(0.9375) and res.invalid_reasons() == []


def test_prefix_cache_hits_make_a_run_invalid() -> None:
    """Seen on the real CPU server with --enable-prompt-tokens-details: a repeated 300-token
    prompt came back with cached_tokens = 256; both signals must invalidate the run."""
    parts = [chunk("a"), chunk("b"), usage(300, 2, 256), DONE]
    rec = asyncio.run(record(parts))
    assert rec.success and rec.cached_tokens == 256
    res = RunResult((rec,), 0, 10**9, 1, 1, (), max_loop_lag_ms=50.0)
    assert res.invalid_reasons() == ["request 0: 256 prompt tokens came from the prefix cache"]
    fresh = dataclasses.replace(rec, cached_tokens=0)
    res = RunResult((fresh,), 0, 10**9, 1, 1, (), 50.0, server_cache_hits=16.0)
    assert len(res.invalid_reasons()) == 1
    assert "server counted 16 prefix-cache hit tokens" in res.invalid_reasons()[0]
    assert RunResult((fresh,), 0, 10**9, 1, 1, (), 50.0, 0.0).invalid_reasons() == []


def test_unexpected_client_error_fails_one_request_only(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    bad = {**completion_payload("m", "ok", 2), "unserializable": {1, 2}}  # a set is not JSON
    res = run_requests(ep, [completion_payload("m", "ok", 2), bad], progress=False)
    assert res.records[0].success
    err = res.records[1].error
    assert err is not None and err.startswith("client error (TypeError")


def test_a_stuck_server_stops_the_run(fault_server: FaultServer) -> None:
    """One request waits its whole first-token timeout while nothing else gets a token: the
    rest are not sent (each would only wait out the same timeout)."""
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    t0 = time.monotonic()
    res = run_requests(
        ep,
        [completion_payload("m", "hang", 2)] * 4,
        timeout_s=60,
        first_token_timeout_s=0.3,
        stop_when_stuck=True,
        progress=False,
    )
    assert time.monotonic() - t0 < 3
    assert res.records[0].first_token_timed_out
    assert res.records[0].error == "timeout: no first token within 0.3 s"
    assert all(
        r.error is not None and r.error.startswith("not sent: the server is stuck")
        for r in res.records[1:]
    )
    why = res.stuck()
    assert why is not None and "request 0 got timeout: no first token within 0.3 s" in why


def test_a_slow_request_beside_working_ones_is_not_stuck(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    payloads = [completion_payload("m", m, 2) for m in ("hang", "ok", "ok")]
    res = run_requests(
        ep,
        payloads,
        concurrency=None,
        first_token_timeout_s=0.3,
        stop_when_stuck=True,
        progress=False,
    )
    assert res.records[0].first_token_timed_out
    assert res.records[1].success and res.records[2].success
    assert res.stuck() is None  # the server answered others while request 0 waited


def test_deadline_bounds_the_whole_run(fault_server: FaultServer) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    t0 = time.monotonic()
    res = run_requests(
        ep,
        [completion_payload("m", "hang", 2)] * 3,
        timeout_s=60,
        deadline_ns=time.perf_counter_ns() + 500_000_000,
        progress=False,
    )
    assert time.monotonic() - t0 < 3
    first = res.records[0].error
    assert first is not None and first.startswith("the run's deadline passed (timeout: no first")
    assert [r.error for r in res.records[1:]] == ["not sent: the run's deadline had passed"] * 2
    assert res.stuck() is None  # cut short by the deadline: no evidence of a stuck server


def test_cancelled_streams_are_kept_apart_from_failures(fault_server: FaultServer) -> None:
    """Issue 17 item 7: the client closes chosen streams after k token chunks; those records
    are cancelled (neither success nor failure), the others complete and the run counts."""
    ep = Endpoint(base_url=f"http://127.0.0.1:{fault_server.port}", model="m")
    payloads = [completion_payload("m", "ok", 6) for _ in range(4)]
    res = run_requests(ep, payloads, concurrency=2, cancel_after=[None, 2, None, 1], progress=False)
    assert [r.cancelled for r in res.records] == [False, True, False, True]
    assert [len(r.chunk_ns) for r in res.cancelled] == [2, 1]
    assert res.records[1].error == "cancelled by the client after 2 token chunks"
    assert res.failed == () and res.error_rate == 0.0 and res.invalid_reasons() == []
    assert [r.index for r in res.survivors().records] == [0, 2]
    assert all(r.success and r.output_tokens == 6 for r in res.survivors().records)


def test_cancel_after_is_checked() -> None:
    ep = Endpoint(base_url="http://127.0.0.1:9", model="m")
    one = [completion_payload("m", "ok", 2)]
    with pytest.raises(ClientError, match="1 cancel_after entries for 2 payloads"):
        run_requests(ep, one * 2, cancel_after=[1], progress=False)
    with pytest.raises(ClientError, match="cancel_after must be None or >= 1"):
        run_requests(ep, one, cancel_after=[0], progress=False)


def test_expected_cache_hits_do_not_invalidate_a_run() -> None:
    """Multi-turn sessions and a trace's shared prefixes are meant to hit the cache."""
    parts = [chunk("a"), chunk("b"), usage(300, 2, 256), DONE]
    rec = asyncio.run(record(parts))
    res = RunResult((rec,), 0, 10**9, 1, 1, (), 50.0, 256.0, expect_cached=True)
    assert res.invalid_reasons() == [] and res.cache_hits() == []


def test_a_run_leaves_the_heap_before_it_out_of_the_collector() -> None:
    """Objects alive before a run are frozen during it (no full collection walks them: one
    took 266 ms mid-run in a process that had imported vLLM) and unfrozen after; a heap
    someone else froze stays as they left it."""
    import gc

    from servelab.loadgen import frozen_heap

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    sentinel: list[object] = [object()]  # a tracked container, alive before the freeze
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_heap():
            pass
        # Still frozen, and nothing more was: frozen objects that die leave the count (it fell
        # by 3 once in a fresh-clone CI run), so the count alone cannot stay equal.
        assert 0 < gc.get_freeze_count() <= frozen
        assert not any(o is sentinel for o in gc.get_objects()), "frozen_heap unfroze the heap"
    finally:
        gc.unfreeze()
    assert any(o is sentinel for o in gc.get_objects())
