"""The SSE decoder, fed streams split at every byte (and at every pair of bytes)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servelab.sse import SSEDecoder

EVENTS = [
    json.dumps({"choices": [{"text": "héllo wörld ✓"}]}),  # multi-byte UTF-8
    json.dumps({"choices": [{"text": ""}]}),
    json.dumps({"choices": [], "usage": {"completion_tokens": 2}}),
    "[DONE]",
]


def stream(sep: bytes = b"\n") -> bytes:
    """A vLLM-like stream with keep-alive comments, an ignored field and a multi-line event."""
    out = b": keep-alive" + sep + sep
    for i, e in enumerate(EVENTS):
        if i == 1:
            out += b"event: message" + sep + b"id: 7" + sep
        out += b"data: " + e.encode() + sep + sep
        out += b":ping" + sep
    out += b"data:line1" + sep + b"data: line2" + sep + sep
    return out


EXPECTED = [*EVENTS, "line1\nline2"]


def decode_split(data: bytes, cuts: list[int]) -> tuple[list[str], SSEDecoder]:
    d = SSEDecoder()
    out: list[str] = []
    prev = 0
    for c in [*cuts, len(data)]:
        out += d.feed(data[prev:c])
        prev = c
    out += d.close()
    return out, d


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_single_split_point(sep: bytes) -> None:
    data = stream(sep)
    for cut in range(len(data) + 1):
        out, d = decode_split(data, [cut])
        assert out == EXPECTED, f"split at byte {cut}"
        assert d.comments == 5
        assert not d.pending


def test_byte_by_byte() -> None:
    for sep in (b"\n", b"\r\n", b"\r"):
        data = stream(sep)
        out, _ = decode_split(data, list(range(1, len(data))))
        assert out == EXPECTED


def test_every_pair_of_split_points_crlf() -> None:
    data = stream(b"\r\n")[:120]  # pairs are quadratic: the first events cover every case
    whole, _ = decode_split(data, [])
    for a in range(len(data)):
        for b in range(a, len(data)):
            assert decode_split(data, [a, b])[0] == whole


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=400), max_size=30),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_random_splits(cuts: list[int], sep: bytes) -> None:
    data = stream(sep)
    out, _ = decode_split(data, sorted(c % (len(data) + 1) for c in cuts))
    assert out == EXPECTED


def test_events_come_out_as_soon_as_complete() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a\n") == []
    assert d.pending
    assert d.feed(b"\n") == ["a"]
    assert d.feed(b"data: b\n\ndata: c\n\n") == ["b", "c"]


def test_unterminated_last_event_is_kept_on_close() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"x": 1}') == []
    assert d.close() == ['{"x": 1}']
    d2 = SSEDecoder()
    assert d2.feed(b"data: y\n") == []
    assert d2.close() == ["y"]


def test_only_one_space_after_colon_is_removed() -> None:
    assert SSEDecoder().feed(b"data:  two\n\n") == [" two"]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    d = SSEDecoder()
    assert d.feed(b"\n\n\n: c\n\nid: 3\n\n") == []
    assert d.events == 0
    assert d.comments == 1


def test_one_event_per_read_fast_path_matches_general_path() -> None:
    events = [b'data: {"a": 1}\n\n', b"data:x\n\n", b"data: [DONE]\n\n", b"data: a\r\n\r\n"]
    fast = SSEDecoder()
    got = [p for e in events for p in fast.feed(e)]
    assert got == ['{"a": 1}', "x", "[DONE]", "a"]
    assert fast.events == 4
    slow = SSEDecoder()
    assert slow.feed(b"".join(events)) == got
