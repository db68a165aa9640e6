"""The streaming client against typed fakes.

Stand-ins, and why they are honest here: the point of these tests is the client's own
behaviour on bad input (HTTP errors, a reset mid-stream, malformed chunks, no first token
before the timeout), which a real vLLM server cannot be made to produce on demand. The
fakes speak the same wire format (HTTP/1.1 chunked SSE, OpenAI chunk objects); no figure is
ever measured against them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from servelab import client
from servelab.client import RequestRecord, completion_payload, http_session, stream_completion
from servelab.errors import ClientError
from servelab.server import Endpoint
from tests.fakes.sse import DONE, chunk, parts_server, usage


async def one(
    parts: list[bytes | float | Exception], status: int = 200, **kw: Any
) -> RequestRecord:
    payload = kw.pop("payload", completion_payload("m", "hi", 2))
    async with (
        parts_server(parts, status) as base,
        http_session() as http,
    ):
        return await stream_completion(http, Endpoint(base, "m"), payload, **kw)


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
    """The server resets the connection after one chunk (its transport aborted mid-body)."""
    parts: list[bytes | float | Exception] = [chunk("a"), 0.01, ConnectionResetError()]
    r = asyncio.run(one(parts))
    assert not r.success and r.error is not None
    assert "mid-stream" in r.error and "ClientPayloadError" in r.error, r.error
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


def test_an_engine_without_done_ends_on_its_finish_reason() -> None:
    """transformers serve sends no [DONE] (EngineTraits.done_marker): with done_marker=False a
    stream that ends after a finish_reason is complete; one cut before it still fails."""
    ended: list[bytes | float | Exception] = [
        chunk("a"),
        chunk("b", finish_reason="length"),
        usage(1, 2),
    ]
    assert asyncio.run(one(ended)).error == "stream ended before [DONE]"
    r = asyncio.run(one(ended, done_marker=False))
    assert r.success and r.error is None and r.output_tokens == 2
    cut = asyncio.run(one([chunk("a"), usage(1, 1)], done_marker=False))
    assert cut.error is not None and "without a finish_reason" in cut.error


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


def test_an_error_without_a_message_is_named_by_its_cause() -> None:
    """An HTTP library's error may carry an empty message (httpx's ReadError after a reset
    did); the record names the OSError under it instead of ending in a bare colon."""
    import aiohttp

    reset = aiohttp.ClientPayloadError("")
    reset.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert client._cause(reset) == "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert client._cause(aiohttp.ServerDisconnectedError()) == "Server disconnected"
    a, b = RuntimeError(""), ValueError("")  # a chain set by hand that loops, no message
    a.__cause__, b.__cause__ = b, a
    assert client._cause(a) == "no detail given"


def test_cancel_after_closes_the_stream_mid_generation() -> None:
    """Issue 17 item 7: after k token chunks the client stops reading and records why."""
    parts: list[bytes | float | Exception] = [
        chunk("a", token_ids=[1]),
        chunk("b", token_ids=[2]),
        chunk("c", token_ids=[3]),
        usage(5, 3),
        DONE,
    ]
    r = asyncio.run(one(parts, cancel_after=2))
    assert r.cancelled and not r.success and not r.first_token_timed_out
    assert r.error == "cancelled by the client after 2 token chunks"
    assert len(r.chunk_ns) == 2 and r.text == "ab" and r.completion_tokens is None
    assert r.done_ns is not None
    full = asyncio.run(one(parts, cancel_after=3))  # the last chunk: cancelled all the same
    assert full.cancelled and len(full.chunk_ns) == 3
    assert not asyncio.run(one(parts)).cancelled


def test_cancel_after_must_be_positive() -> None:
    with pytest.raises(ClientError, match="cancel_after must be >= 1"):
        asyncio.run(one([DONE], cancel_after=0))


def test_a_prompt_of_token_ids_is_sent_as_a_list() -> None:
    body = completion_payload("m", (5, 6, 7), 2)
    assert body["prompt"] == [5, 6, 7]
    assert completion_payload("m", "hi", 2)["prompt"] == "hi"
