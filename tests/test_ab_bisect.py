"""Bisect over stand-in builds: each build adds a per-token delay (as the live test's proxy
does) to a 70 ms TPOT with 3 % run noise; the A/B machinery finds the first slow one."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from servelab import sequential as sq
from servelab.ab import Measure
from servelab.ab_bisect import bisect_builds

PLAN = sq.plan(sq.Design(max_units=sq.units_needed(0.03)))


def stand_in(rng: np.random.Generator) -> Callable[[float], Measure]:
    def measure_of(delay_ms: float) -> Measure:
        return lambda i: (70.0 + delay_ms) * math.exp(rng.normal(0.0, 0.03))

    return measure_of


@pytest.mark.parametrize("first", [1, 4, 7])
def test_finds_the_first_build_with_a_ten_percent_slowdown(first: int) -> None:
    builds = [0.0] * first + [7.0] * (8 - first)  # +10 % TPOT from build `first` on
    rng = np.random.default_rng(first)
    seen: list[int] = []
    res = bisect_builds(
        builds, stand_in(rng), PLAN, "lower", rng, on_step=lambda s: seen.append(s.index)
    )
    assert res.first_bad == first and res.last_good == first - 1, res.describe()
    assert seen[0] == 7 and len(seen) <= 1 + math.ceil(math.log2(8))
    assert f"first regressed build: #{first}" in res.describe()
    assert res.runs == sum(s.result.verdict.runs for s in res.steps) > 0


def test_no_regression_at_the_last_build_is_nothing_to_bisect() -> None:
    rng = np.random.default_rng(9)
    res = bisect_builds([0.0] * 5, stand_in(rng), PLAN, "lower", rng)
    assert res.first_bad is None and len(res.steps) == 1
    assert "the last build #4 against the reference" in res.describe()


def test_an_undecided_step_stops_and_names_the_range() -> None:
    rng = np.random.default_rng(3)
    # Build 2 is 2.5 % slower: inside neither +-5 % "no change" nor a regression, at once.
    tiny = sq.plan(sq.Design(max_units=5))
    res = bisect_builds([0.0, 0.0, 1.75, 14.0, 14.0], stand_in(rng), tiny, "lower", rng)
    assert res.first_bad is None and res.last_good == 0
    assert "build #2 1.75 is undecided (inconclusive)" in res.stopped
    assert "lies in #1..#4; raise the A/B budget" in res.stopped


def test_a_single_build_cannot_be_bisected() -> None:
    with pytest.raises(ValueError, match="reference and at least one later build"):
        bisect_builds(
            [0.0], stand_in(np.random.default_rng(0)), PLAN, "lower", np.random.default_rng(0)
        )
