"""Metrics against hand-computed cases (times below are in milliseconds, records in ns).

The same definitions are checked against vLLM's own ``calculate_metrics`` on random runs in
perf/test_agreement.py (importing vLLM takes ~10 s, too long for the unit tests).
"""

from __future__ import annotations

import math

import pytest

from servelab import metrics
from servelab.client import RequestRecord
from servelab.errors import ConfigError

MS = 1_000_000


def rec(
    index: int,
    send_ms: float,
    chunks_ms: list[float],
    *,
    n: int | None,
    prompt: int | None = 10,
    arrival_ms: float | None = None,
    error: str | None = None,
    tokens: list[int | None] | None = None,
    first_text_ms: float | None = None,
    requested: int | None = None,
) -> RequestRecord:
    c = tuple(int(t * MS) for t in chunks_ms)
    return RequestRecord(
        index=index,
        api="completions",
        arrival_ns=int((send_ms if arrival_ms is None else arrival_ms) * MS),
        send_ns=int(send_ms * MS),
        first_token_ns=c[0] if c else None,
        first_text_ns=int(first_text_ms * MS)
        if first_text_ms is not None
        else (c[0] if c else None),
        end_ns=c[-1] if c else None,
        done_ns=c[-1] if c else None,
        chunk_ns=c,
        chunk_tokens=tuple(tokens) if tokens is not None else tuple(1 for _ in c),
        text="x" * len(c),
        finish_reason="length",
        prompt_tokens=prompt,
        completion_tokens=n,
        cached_tokens=None,
        requested_prompt_tokens=prompt,
        requested_output_tokens=requested,
        status_code=200 if error is None else 500,
        error=error,
    )


RUN = [
    rec(0, 0, [100, 150, 250], n=3, prompt=10),
    rec(1, 50, [250, 300], n=2, prompt=20, arrival_ms=0),
    rec(2, 60, [], n=None, error="HTTP 500: boom"),
]


def compute(**kw: object) -> metrics.ServingMetrics:
    return metrics.compute(RUN, 0, 1000 * MS, **kw)  # type: ignore[arg-type]


def test_counts_and_throughputs() -> None:
    m = compute()
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (30, 5)
    assert m.duration_s == pytest.approx(1.0)
    assert m.request_throughput == pytest.approx(2.0)
    assert m.output_throughput == pytest.approx(5.0)
    assert m.total_token_throughput == pytest.approx(35.0)
    assert m.request_goodput is None
    assert m.errors == ("HTTP 500: boom",)


def test_latency_distributions() -> None:
    m = compute()
    assert m.ttft_ms is not None and m.tpot_ms is not None
    assert m.itl_ms is not None and m.e2el_ms is not None
    assert (m.ttft_ms.mean, m.ttft_ms.median, m.ttft_ms.std) == pytest.approx((150, 150, 50))
    assert m.ttft_ms.pct(90) == pytest.approx(190)  # linear interpolation, like np.percentile
    assert m.ttft_ms.pct(99) == pytest.approx(199)
    # TPOT per request: (250-100)/2 = 75 and (300-50-200)/1 = 50
    assert (m.tpot_ms.mean, m.tpot_ms.median, m.tpot_ms.std) == pytest.approx((62.5, 62.5, 12.5))
    # ITL pooled over requests: 50, 100 and 50
    assert m.itl_ms.count == 3
    assert m.itl_ms.mean == pytest.approx(200 / 3)
    assert m.itl_ms.median == pytest.approx(50)
    assert m.itl_ms.std == pytest.approx(
        math.sqrt(((50 - 200 / 3) ** 2 * 2 + (100 - 200 / 3) ** 2) / 3)
    )
    assert m.e2el_ms.median == pytest.approx(250)
    assert m.client_queue_ms is not None and m.client_queue_ms.max == pytest.approx(50)


def test_goodput() -> None:
    assert compute(slos_ms={"ttft": 150}).request_goodput == pytest.approx(1.0)
    assert compute(slos_ms={"tpot": 60}).request_goodput == pytest.approx(1.0)
    assert compute(slos_ms={"ttft": 150, "tpot": 60}).request_goodput == 0
    assert compute(slos_ms={"e2el": 250}).request_goodput == pytest.approx(2.0)  # <= passes
    with pytest.raises(ConfigError, match="unknown metric"):
        compute(slos_ms={"itl": 5})


def test_goodput_counts_tpot_as_zero_for_single_token_outputs() -> None:
    one = [rec(0, 0, [100], n=1)]
    m = metrics.compute(one, 0, 1000 * MS, slos_ms={"tpot": 0.001})
    assert m.request_goodput == pytest.approx(1.0)
    assert m.tpot_ms is None  # no TPOT for N = 1, and None rather than vLLM's 0


def test_peaks() -> None:
    m = compute()
    assert m.max_output_tokens_per_s == 5  # every chunk lands in the first 1-s bucket
    assert m.max_concurrent_requests == 2
    assert m.peak_concurrency == 2


def test_sweep_peak_is_exact_and_half_open() -> None:
    assert metrics.sweep_peak([(0, 10), (10, 20)]) == 1  # touching intervals do not overlap
    assert metrics.sweep_peak([(0, 10), (5, 20), (6, 7)]) == 3
    assert metrics.sweep_peak([]) == 0


def test_vllm_bucket_peak_differs_from_sweep_line() -> None:
    # Two requests in the same second that never overlap: vLLM's 1-s buckets say 2.
    run = [rec(0, 0, [100], n=1), rec(1, 200, [300], n=1)]
    m = metrics.compute(run, 0, 1000 * MS)
    assert (m.max_concurrent_requests, m.peak_concurrency) == (2, 1)


def test_lab_metrics() -> None:
    m = compute(window=3)
    assert m.wall_aggregate_tok_s == pytest.approx(5 / 0.3)
    assert m.aggregate_from_first_text_tok_s == pytest.approx(5 / 0.2)
    assert m.decode_tok_s is not None and m.prefill_tok_s is not None
    assert sorted([m.decode_tok_s.min, m.decode_tok_s.max]) == pytest.approx([2 / 0.15, 20])
    assert m.prefill_tok_s.median == pytest.approx(100)  # 10/0.1 and 20/0.2
    # window 3: only request 0 has 3 tokens: 2 / (250 - 100 ms)
    assert m.window_tok_s is not None and m.window_tok_s.count == 1
    assert m.window_tok_s.median == pytest.approx(2 / 0.15)
    assert m.after_ttft_tok_s is not None
    assert m.after_ttft_tok_s.max == pytest.approx(2 / 0.05)  # N / (end - first text)


def test_lab_ttft_waits_for_text_after_a_role_chunk() -> None:
    r = rec(0, 0, [100, 200, 300], n=2, tokens=[0, 1, 1], first_text_ms=200)
    m = metrics.compute([r], 0, 1000 * MS)
    assert m.ttft_ms is not None and m.lab_ttft_ms is not None
    assert (m.ttft_ms.median, m.lab_ttft_ms.median) == pytest.approx((100, 200))
    assert metrics.token_times_ns(r) == [200 * MS, 300 * MS]  # the role chunk has no token


def test_window_uses_token_ids_for_multi_token_chunks() -> None:
    r = rec(0, 0, [100, 200], n=4, tokens=[2, 2])
    assert metrics.window_rate(r, 4) == pytest.approx(3 / 0.1)
    assert metrics.window_rate(r, 5) is None


def test_empty_run_reports_none_not_zero() -> None:
    m = metrics.compute([RUN[2]], 0, 1000 * MS)
    assert m.completed == 0 and m.failed == 1
    assert m.ttft_ms is None and m.tpot_ms is None and m.itl_ms is None
    assert m.max_output_tokens_per_s is None and m.wall_aggregate_tok_s is None


def test_output_length_fallbacks() -> None:
    assert metrics.output_len(rec(0, 0, [1, 2, 3], n=7)) == 7  # usage wins
    assert metrics.output_len(rec(0, 0, [1, 2], n=None, tokens=[2, 3])) == 5  # token_ids
    assert metrics.output_len(rec(0, 0, [1, 2], n=None, tokens=[None, None])) == 2  # chunks


def test_vllm_json_keys() -> None:
    m = compute(percentiles=(99, 99.9), slos_ms={"ttft": 150})
    out = metrics.to_vllm_json(m, RUN)
    for key in (
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p99_ttft_ms",
        "p99.9_ttft_ms",
        "mean_tpot_ms",
        "p99_itl_ms",
        "median_e2el_ms",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
        "input_lens",
        "output_lens",
        "ttfts",
        "itls",
        "errors",
    ):
        assert key in out, key
    assert out["output_lens"] == [3, 2, 0]
    assert out["ttfts"][2] is None
    assert out["errors"] == ["", "", "HTTP 500: boom"]
    assert out["p99_ttft_ms"] == pytest.approx(199)
    only = metrics.to_vllm_json(m, percentile_metrics=("ttft",))
    assert "mean_tpot_ms" not in only and "input_lens" not in only
    with pytest.raises(ConfigError):
        metrics.to_vllm_json(m, percentile_metrics=("bogus",))
    assert metrics.percentile_key(99.0) == "99" and metrics.percentile_key(99.9) == "99.9"


def test_steady_state_window() -> None:
    # Three streams overlap only between 40 and 100 ms.
    run = [
        rec(0, 0, [100], n=1),
        rec(1, 20, [150], n=1),
        rec(2, 40, [60, 80, 120], n=3),
    ]
    assert metrics.steady_state_window(run, 0.95) == (40 * MS, 100 * MS)
    # Chunks at 60 and 80 ms fall inside: 2 tokens in 60 ms.
    assert metrics.output_rate_in(run, (40 * MS, 100 * MS)) == pytest.approx(2 / 0.06)
    assert metrics.steady_state_window([RUN[2]]) is None


def test_distribution_none_when_empty() -> None:
    assert metrics.distribution([]) is None
    d = metrics.distribution([1.0, 2.0, 3.0, 4.0], (50, 90))
    assert d is not None and d.pct(90) == pytest.approx(3.7)
    with pytest.raises(KeyError):
        d.pct(99)
