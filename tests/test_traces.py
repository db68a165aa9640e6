"""Mooncake-layout traces (servelab.traces): reading, checking, the replay schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from servelab import traces
from servelab.errors import ConfigError, ServelabError

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "fixtures" / "traces" / "mooncake-small.jsonl"


def line(ts: int, n_in: int = 8, n_out: int = 2, ids: str = "[]") -> str:
    return (
        f'{{"timestamp": {ts}, "input_length": {n_in}, "output_length": {n_out}, '
        f'"hash_ids": {ids}}}'
    )


def test_the_committed_trace_loads_and_replays() -> None:
    t = traces.load_trace(SMALL)
    assert len(t.entries) == 8 and t.span_s == pytest.approx(3.0)
    assert t.entries[0] == traces.TraceEntry(0, 32, 8, (0,))
    assert traces.replay_offsets(t) == pytest.approx((0.0, 0.4, 0.7, 1.3, 1.6, 2.2, 2.5, 3.0))
    assert traces.replay_offsets(t, 2.0)[-1] == pytest.approx(1.5)
    assert traces.lengths(t)[3] == (64, 4)
    assert t.shared_block_share() == pytest.approx(3 / 8)  # ids 0, 1, 0 repeat
    assert len(t.sha256) == 64
    label = t.describe(2.0)
    assert "8 requests over 3 s" in label and "2x speed" in label and "38 %" in label
    assert "input 24-64 tokens" in label and "output 4-8 tokens" in label


def test_hash_ids_are_optional_and_blank_lines_skipped() -> None:
    t = traces.parse_trace(
        '{"timestamp": 5, "input_length": 8, "output_length": 2}\n\n' + line(5), source="t"
    )
    assert [e.hash_ids for e in t.entries] == [(), ()]
    assert traces.replay_offsets(t) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "t line 1: not a JSON object"),
        (
            line(0) + "\n" + '{"timestamp": "1", "input_length": 8, "output_length": 2}',
            "t line 2: field 'timestamp' must be int",
        ),
        ('{"timestamp": 0, "input_length": 8, "output_length": 2, "x": 1}', "t line 1"),
        ('{"timestamp": 0, "input_length": 8}', "output_length"),
        (line(100) + "\n" + line(50), "t line 2: field 'timestamp' 50 falls before"),
        (line(-1), "must be >= 0 ms"),
        (line(0, n_in=0), "'input_length' must be >= 1"),
        (line(0, n_out=0), "'output_length' must be >= 1"),
        (line(0, n_in=600, ids="[1, 2, 3]"), "3 hash_ids for 600 input tokens"),
        ("\n\n", "holds no requests"),
    ],
)
def test_bad_traces_say_where_and_what(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        traces.parse_trace(text, source="t")
    assert isinstance(info.value, ServelabError)


def test_speedup_must_be_positive_and_a_missing_file_is_named(tmp_path: Path) -> None:
    t = traces.parse_trace(line(0), source="t")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="speedup"):
            traces.replay_offsets(t, bad)
    with pytest.raises(ConfigError, match="cannot read it"):
        traces.load_trace(tmp_path / "missing.jsonl")


SHARED = REPO / "fixtures" / "traces" / "mooncake-shared.jsonl"


def test_cacheable_share_follows_the_leading_hash_ids() -> None:
    """Issue 17: a block counts as cacheable only after the same leading run of ids; at the
    engine's block size only whole blocks count and the last prompt token is computed."""
    t = traces.load_trace(SHARED, block_tokens=64)
    assert t.block_tokens == 64
    assert traces.cacheable_tokens(t) == [0, 128, 0, 192, 0, 128, 64, 128]
    assert traces.cacheable_share(t) == pytest.approx(640 / 1064)
    assert traces.cacheable_tokens(t, 128) == [0, 128, 0, 128, 0, 128, 0, 128]
    chain = traces.parse_trace(
        "\n".join([line(0, 8, 1, "[1, 2]"), line(1, 8, 1, "[3, 2]"), line(2, 4, 1, "[1]")]),
        source="t",
        block_tokens=4,
    )
    # id 2 after a different first block is not a cached prefix; a whole prompt is
    assert traces.cacheable_tokens(chain) == [0, 0, 4]
    assert traces.cacheable_tokens(chain, 2) == [0, 0, 2]


def test_prompt_token_ids_share_blocks_by_hash_id() -> None:
    t = traces.load_trace(SHARED, block_tokens=64)
    pool = list(range(1000, 1500))
    ids = traces.prompt_token_ids(t, pool, nonce="a")
    assert [len(x) for x in ids] == [e.input_length for e in t.entries]
    assert all(tok in set(pool) for x in ids for tok in x)
    assert ids[0][:128] == ids[1][:128] and ids[0][128:150] != ids[1][128:150]
    assert ids[3][:160] == ids[0]  # [0, 1, 2] then its own block 5
    assert ids[6] == ids[0][:64]  # [0]: the first block, whole prompt
    assert ids[4][:128] == ids[5][:128] and ids[2][:40] != ids[0][:40]
    again = traces.prompt_token_ids(t, pool, nonce="a")
    fresh = traces.prompt_token_ids(t, pool, nonce="b")
    assert again == ids and fresh[0][:64] != ids[0][:64]
    with pytest.raises(ConfigError, match="empty token pool"):
        traces.prompt_token_ids(t, [], nonce="a")
