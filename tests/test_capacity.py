"""Capacity under SLOs (servelab.capacity) on hand-made runs and stand-in measurements."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from servelab import capacity
from servelab.errors import ConfigError
from tests.test_sweeps import rec, run  # one way to build request rows for both


def test_slo_check_value_and_certification() -> None:
    # TTFT 100..105 ms, TPOT 150 ms for 6 requests.
    r = run([rec(i, 0, [100 + i, 250 + i, 400 + i]) for i in range(6)], 1000)
    ok = capacity.slo_check(1.0, r, {"ttft": 200.0, "tpot": 160.0})
    assert ok.passed and not ok.certified  # 6 samples cannot certify a p99
    assert "p99 ttft" in ok.detail and "held" in ok.detail and "N = 6" in ok.detail
    miss = capacity.slo_check(1.0, r, {"ttft": 104.0})
    assert not miss.passed and "missed" in miss.detail
    many = run([rec(i, 0, [10.0, 20.0]) for i in range(500)], 1000)
    sure = capacity.slo_check(1.0, many, {"ttft": 50.0})
    assert sure.passed and sure.certified and "certified" in sure.detail
    failed = run([rec(0, 0, [10.0, 20.0]), rec(1, 0, [], error="boom")], 1000)
    assert not capacity.slo_check(1.0, failed, {"ttft": 50.0}).passed  # a failure holds nothing
    with pytest.raises(ConfigError, match="no SLOs"):
        capacity.slo_check(1.0, r, {})


def _fake(limit: float) -> tuple[list[float], Callable[[float], capacity.SloCheck]]:
    asked: list[float] = []

    def measure(load: float) -> capacity.SloCheck:
        asked.append(load)
        return capacity.SloCheck(load, load <= limit, False, f"load {load:g}")

    return asked, measure


def test_capacity_brackets_then_bisects() -> None:
    asked, measure = _fake(5.0)
    cap = capacity.capacity_search(measure, 1.0, rel_tol=0.1, max_runs=10)
    assert asked[:4] == [1.0, 2.0, 4.0, 8.0]  # bracket: 4 holds, 8 fails
    assert asked[4:] == [6.0, 5.0, 5.5]  # bisection until the gap <= 10 % of the pass
    assert cap.load == 5.0 and cap.fails_at == 5.5 and len(cap.checks) == 7
    assert cap.describe("req/s").startswith("capacity 5 req/s (held by the value")


def test_capacity_stops_at_its_budget_and_at_a_failed_start() -> None:
    asked, measure = _fake(100.0)
    cap = capacity.capacity_search(measure, 1.0, max_runs=3)
    assert asked == [1.0, 2.0, 4.0] and cap.load == 4.0 and cap.fails_at is None
    assert "no level failed: a lower bound" in cap.describe("req/s")
    asked, measure = _fake(0.5)
    cap = capacity.capacity_search(measure, 1.0)
    assert asked == [1.0] and cap.load is None and "no capacity" in cap.describe("req/s")
    with pytest.raises(ConfigError, match="capacity search"):
        capacity.capacity_search(measure, 0.0)
