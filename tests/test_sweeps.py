"""Rate sweeps, saturation, the knee and percentile figures (servelab.sweeps), on hand-made
points and runs (times in ms, records in ns)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from servelab import sweeps
from servelab.catalogue import CATALOGUE, spec
from servelab.client import RequestRecord
from servelab.errors import ConfigError
from servelab.loadgen import RunResult
from servelab.profiles import load_profile

MS = 1_000_000
REPO = Path(__file__).resolve().parents[1]


def rec(
    index: int, send_ms: float, chunks_ms: list[float], error: str | None = None
) -> RequestRecord:
    c = tuple(int(t * MS) for t in chunks_ms)
    return RequestRecord(
        index=index,
        api="completions",
        arrival_ns=int(send_ms * MS),
        send_ns=int(send_ms * MS),
        first_token_ns=c[0] if c else None,
        first_text_ns=c[0] if c else None,
        end_ns=c[-1] if c else None,
        done_ns=c[-1] if c else None,
        chunk_ns=c,
        chunk_tokens=tuple(1 for _ in c),
        text="x" * len(c),
        finish_reason="length",
        prompt_tokens=10,
        completion_tokens=len(c),
        cached_tokens=None,
        requested_prompt_tokens=10,
        requested_output_tokens=len(c),
        status_code=200 if error is None else 500,
        error=error,
    )


def run(records: list[RequestRecord], end_ms: float) -> RunResult:
    return RunResult(tuple(records), 0, int(end_ms * MS), None, 1, (), 50.0)


def pt(
    load: float,
    tok_s: float,
    lat_ms: float | None,
    *,
    pace: float | None = None,
    failed: int = 0,
    open_loop: bool = True,
) -> sweeps.Point:
    return sweeps.Point(
        load=load,
        requests=6,
        completed=6 - failed,
        failed=failed,
        achieved_rps=load,
        output_tok_s=tok_s,
        goodput_rps=None,
        median_latency_ms=lat_ms,
        offered_rps=load if open_loop else None,
        pace=pace,
    )


# --------------------------------------------------------------------------- rates


def test_geometric_rates_and_checks() -> None:
    assert sweeps.geometric_rates(0.5, 2.0, 4) == (0.5, 1.0, 2.0, 4.0)
    assert sweeps.sweep_rates((), 1.0, 3.0, 3) == (1.0, 3.0, 9.0)
    assert sweeps.sweep_rates((1.0, 2.0)) == (1.0, 2.0)
    for bad in ((), (1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (1.0, math.inf)):
        with pytest.raises(ConfigError, match="rate sweep"):
            sweeps.check_rates(bad)
    with pytest.raises(ConfigError, match="start_rps"):
        sweeps.sweep_rates((), 0.0, 2.0, 3)  # neither rates nor a ramp


def test_axes_and_labels() -> None:
    assert sweeps.milli(0.5) == 500 and sweeps.milli(4.0) == 4000
    assert [sweeps.percentile_axis(p) for p in (50.0, 90.0, 99.0, 99.9)] == [50, 90, 99, 999]
    assert "Poisson" in sweeps.arrival_label(1.0, 0) and "seed 0" in sweeps.arrival_label(1.0, 0)
    assert "burstiness 0.5" in sweeps.arrival_label(0.5, 3)
    assert "constant" in sweeps.arrival_label(math.inf, None)
    assert sweeps.slos_ms(2000.0, None) == {"ttft": 2000.0}
    assert sweeps.slo_label({"ttft": 2000.0}) == "goodput SLOs: TTFT <= 2000 ms"


# --------------------------------------------------------------------------- saturation


def test_saturation_reasons() -> None:
    rule = sweeps.SaturationRule()
    assert rule.why(None, pt(1, 10, 500)) is None
    assert rule.why(pt(1, 10, 500), pt(2, 19, 550)) is None  # scales: not saturated
    assert "failed" in (rule.why(None, pt(1, 10, 500, failed=1)) or "")
    assert "queue" in (rule.why(None, pt(4, 10, 500, pace=0.7)) or "")
    assert rule.why(None, pt(4, 10, 500, pace=0.85)) is None
    flat = rule.why(pt(2, 20, 500), pt(4, 22, 900))
    assert flat is not None and "throughput rose 10 %" in flat
    # Flat throughput alone (latency steady) is not saturation; nor is rising latency alone.
    assert rule.why(pt(2, 20, 500), pt(4, 22, 600)) is None
    assert rule.why(pt(2, 20, 500), pt(4, 40, 900)) is None


def test_knee_bounded_unbounded_and_none() -> None:
    k = sweeps.knee([pt(1, 10, 500), pt(2, 20, 520), pt(4, 22, 1000)])
    assert (k.load, k.bounded, k.levels) == (2, True, (1, 2, 4))
    assert k.describe("req/s").startswith("knee at 2 req/s")
    k = sweeps.knee([pt(1, 10, 500), pt(2, 20, 520)])
    assert (k.load, k.bounded) == (2, False)
    assert "at or above 2 req/s" in k.describe("req/s")
    k = sweeps.knee([pt(1, 10, 500, failed=2), pt(2, 20, 520)])
    assert k.load is None and "no knee" in k.describe("req/s")
    with pytest.raises(ConfigError):
        sweeps.knee([])


def test_sweep_stops_after_the_first_saturated_level() -> None:
    table = {1.0: pt(1, 10, 500), 2.0: pt(2, 20, 520), 4.0: pt(4, 21, 2000), 8.0: pt(8, 21, 9000)}
    asked: list[float] = []

    def measure(load: float) -> sweeps.Point:
        asked.append(load)
        return table[load]

    points, k = sweeps.sweep_until_saturated([1.0, 2.0, 4.0, 8.0], measure)
    assert asked == [1.0, 2.0, 4.0] and len(points) == 3
    assert k.load == 2.0 and k.bounded


def test_the_knee_moves_as_a_verdict_can_see() -> None:
    """Same rates, a slower server: the knee (a figure) falls from 4 to 2 req/s."""
    fast = [pt(1, 10, 500), pt(2, 20, 510), pt(4, 40, 520), pt(8, 42, 3000)]
    slow = [pt(1, 10, 500), pt(2, 20, 510), pt(4, 21, 1500), pt(8, 21, 6000)]
    assert sweeps.knee(fast).load == 4 and sweeps.knee(slow).load == 2


# --------------------------------------------------------------------------- from runs


def test_point_from_a_run() -> None:
    # 2 requests in 1 s: 3 tokens each; E2EL 300 and 500 ms; TTFT 100 ms each.
    r = run([rec(0, 0, [100, 200, 300]), rec(1, 500, [600, 800, 1000])], 1000)
    p = sweeps.point(2.0, r, slos_ms={"ttft": 150.0, "tpot": 90.0})
    assert p.completed == 2 and p.failed == 0 and p.requests == 2
    assert p.achieved_rps == pytest.approx(2.0)
    assert p.output_tok_s == pytest.approx(6.0)
    assert p.median_latency_ms == pytest.approx(400.0)
    assert p.goodput_rps == pytest.approx(0.0)  # TPOTs 100 and 200 ms: over 90
    assert p.offered_rps == 2.0
    assert p.pace == pytest.approx(500 / 700)  # arrivals 0 and 500 ms; ends 300 and 1000
    closed = sweeps.point(2.0, r, open_loop=False)
    assert closed.offered_rps is None and closed.pace is None
    failed = run([rec(0, 0, [100, 200]), rec(1, 0, [], error="boom")], 1000)
    assert sweeps.point(1.0, failed).failed == 1


def test_latency_values_and_percentile_notes() -> None:
    recs = [rec(i, 0, [100 + i, 200 + i, 400 + i]) for i in range(6)]
    r = run(recs, 1000)
    assert sweeps.latency_values_ms(r, "ttft") == pytest.approx([100 + i for i in range(6)])
    assert len(sweeps.latency_values_ms(r, "itl")) == 12  # two gaps per request, pooled
    assert sweeps.latency_values_ms(r, "tpot") == pytest.approx([150.0] * 6)
    with pytest.raises(ConfigError, match="unknown latency"):
        sweeps.latency_values_ms(r, "queue")
    pr = sweeps.percentile_runs([r, r], "ttft", 90.0)
    assert pr.values == pytest.approx((104.5, 104.5))
    notes = " ".join(pr.notes())
    assert "not certifiable at N = 6" in notes and "needs 44" in notes
    assert "pooled over 2 runs" in notes and "N = 12" in notes
    big = run([rec(i, 0, [float(1 + i), float(2 + i)]) for i in range(60)], 1000)
    cert = sweeps.percentile_runs([big], "ttft", 90.0)
    assert "certified" in cert.notes()[0] and "not certifiable" not in cert.notes()[0]


def test_p999_only_where_the_sample_certifies_it() -> None:
    assert sweeps.percentiles_to_report(6) == (50.0, 90.0, 99.0)
    assert sweeps.percentiles_to_report(5000)[-1] == 99.9


def test_every_figure_the_perf_tests_record_is_catalogued() -> None:
    for name in (
        "achieved_rps_r{r}",
        "output_throughput_r{r}",
        "goodput_rps_r{r}",
        "knee_rate_rps",
        "trace_achieved_rps",
        "trace_output_throughput",
    ):
        assert name in CATALOGUE
    for lat in sweeps.LATENCIES:
        for p in (*sweeps.PERCENTILES, sweeps.EXTRA_PERCENTILE):
            q = sweeps.percentile_axis(p)
            assert f"p{q}_{lat}_ms_trace" in CATALOGUE
            fig_title = spec(f"p{q}_{lat}_ms_r{{r}}").title.format(r=500)
            assert fig_title.startswith(f"p{p:g} ") and "500 mreq/s" in fig_title


def test_cpu_profile_carries_the_new_shapes() -> None:
    p = load_profile(REPO / "fixtures" / "profiles" / "cpu-smollm2.toml")
    rs, tr = p.workloads.rate_sweep, p.workloads.trace
    assert rs is not None and tr is not None
    assert sweeps.sweep_rates(rs.rates, rs.start_rps, rs.factor, rs.steps) == (2.0, 4.0, 8.0)
    assert rs.requests_per_rate * len(rs.rates) <= 30  # a CI-sized sweep
    assert p.path is not None and (p.path.parent / tr.path).is_file()


def test_issue17_h5_figures_are_in_the_catalogue() -> None:
    """The names perf/test_multiturn.py, test_cancellation.py and test_trace_replay.py record."""
    for t in (1, 2, 3):
        assert spec("mt_ttft_ms_turn{t}").name.format(t=t) == f"mt_ttft_ms_turn{t}"
    for name in (
        "mt_ttft_ms_turn{t}_control",
        "mt_cached_share_turn{t}",
        "mt_session_s",
        "mt_output_throughput",
        "trace_cached_share",
        "cancel_survivor_output_throughput",
        "cancel_release_ms",
    ):
        assert name in CATALOGUE
    for lat in ("ttft", "tpot", "itl", "e2el"):
        for q in (50, 90, 99, 999):
            assert f"p{q}_{lat}_ms_cancel" in CATALOGUE
