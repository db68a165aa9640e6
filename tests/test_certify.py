"""Certified percentiles (LoadGen's early stopping) and validity verdicts."""

from __future__ import annotations

import math
from typing import Any

import pytest

from servelab import certify


@pytest.mark.parametrize(
    ("p", "overages", "n"),
    [(90, 1, 64), (99, 1, 662), (99.9, 1, 6636), (90, 0, 44), (99, 0, 459), (99.9, 0, 4603)],
)
def test_min_samples_are_loadgens(p: float, overages: int, n: int) -> None:
    assert certify.min_samples(p, overages) == n
    # One sample fewer does not certify: n is the minimum, not just enough.
    assert certify.is_certified(n - overages, overages, p)
    assert not certify.is_certified(n - 1 - overages, overages, p)


def test_tail_probability_with_none_over_is_p_to_the_h() -> None:
    # I_p(h, 1) = p**h: the chance that all h samples fall under the true percentile.
    assert certify.tail_probability(44, 0, 90) == pytest.approx(0.9**44, rel=1e-12)


def test_median_needs_seven() -> None:
    assert certify.min_samples(50) == 7


def test_certify_too_few_says_how_many_are_needed() -> None:
    c = certify.certify([float(v) for v in range(1, 31)], 99)
    assert not c.certifiable and c.n == 30 and c.needed == 459 and c.bound is None
    assert c.value == pytest.approx(29.71)
    assert "not certifiable at N = 30, needs 459" in c.describe()


def test_certify_bound_is_the_sample_that_leaves_the_allowed_overages() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # order does not matter
    c = certify.certify(values, 90)
    assert c.certifiable and c.n == 100
    assert c.overages == certify.max_overages(100, 90)
    assert c.overages is not None
    t = c.overages
    assert certify.is_certified(100 - t, t, 90) and not certify.is_certified(99 - t, t + 1, 90)
    assert c.bound == 100.0 - t  # n - t samples at or under it
    assert "certified at 99 % confidence" in c.describe()


def test_certify_exactly_at_the_minimum_allows_no_overage() -> None:
    c = certify.certify([1.0] * 44, 90)
    assert c.certifiable and c.overages == 0 and c.bound == 1.0
    assert not certify.certify([1.0] * 43, 90).certifiable


def test_certify_drops_non_finite_and_handles_none() -> None:
    c = certify.certify([math.nan, math.inf], 50)
    assert c.n == 0 and c.value is None and not c.certifiable
    assert "no samples" in c.describe()


@pytest.mark.parametrize("p", [0, 100, -1, 101])
def test_percentile_out_of_range_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        certify.min_samples(p)


@pytest.mark.parametrize(
    ("metric", "p"),
    [("p99_ttft_ms", 99.0), ("ttft_ms_p99_c4", 99.0), ("p90_itl_ms", 90.0),
     ("median_ttft_ms_c4", 50.0), ("decode_tok_s", 50.0), ("ttft_ms_p128", 50.0)],
)  # fmt: skip
def test_reported_percentile_from_the_name(metric: str, p: float) -> None:
    assert certify.reported_percentile(metric) == p


def test_validity_valid_figure() -> None:
    v = certify.figure_validity("median_ttft_ms_c4", samples=8, failed=0, duration_s=5.0)
    assert v.valid and v.status == "VALID" and v.describe() == "VALID"


def test_validity_p99_from_few_requests_is_invalid_with_advice() -> None:
    v = certify.figure_validity("p99_ttft_ms", samples=40)
    assert not v.valid and v.status == "INVALID"
    assert "not certifiable at N = 40" in v.reasons[0] and "459" in v.reasons[0]
    assert "at least 459 requests" in v.advice[0]


def test_validity_each_rule_fails_alone() -> None:
    rules = certify.ValidityRules(
        min_duration_s=10.0, max_error_rate=0.01, max_outstanding=8, max_schedule_delay_s=0.005
    )
    ok: dict[str, Any] = dict(samples=100, failed=0, duration_s=20.0, peak_outstanding=8,
              offered_rate=10.0, achieved_rate=10.0, p99_schedule_delay_s=0.001)  # fmt: skip
    assert certify.figure_validity("decode_tok_s", rules=rules, **ok).valid
    changes: list[tuple[dict[str, Any], str]] = [
        ({"failed": 5}, "error rate"),
        ({"duration_s": 2.0}, "under the minimum"),
        ({"peak_outstanding": 9}, "overloaded"),
        ({"achieved_rate": 9.0}, "achieved"),
        ({"p99_schedule_delay_s": 0.05}, "late"),
        ({"samples": 2}, "a verdict needs at least 3"),  # a median over runs
    ]
    for change, word in changes:
        v = certify.figure_validity("decode_tok_s", rules=rules, **{**ok, **change})
        assert not v.valid and len(v.reasons) == 1 and word in v.reasons[0], change
        assert v.advice[0] and word in v.describe()
