"""Interleaved A/B (servelab.ab) on stand-in sides: seeded log-normal runs with a drift."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servelab import ab
from servelab import sequential as sq


class Side:
    """A stand-in side: runs log-normal around `level`, plus a drift both sides share."""

    def __init__(self, level: float, rng: np.random.Generator, clock: list[int], noise: float):
        self.level, self.rng, self.clock, self.noise = level, rng, clock, noise
        self.calls: list[int] = []

    def __call__(self, i: int) -> float:
        self.calls.append(i)
        self.clock[0] += 1
        drift = 0.002 * self.clock[0]  # +0.2 % a run: the machine slowly gets busier
        return self.level * math.exp(self.rng.normal(0.0, self.noise) + drift)


def sides(b_level: float, noise: float = 0.03, seed: int = 0) -> tuple[Side, Side]:
    rng, clock = np.random.default_rng(seed), [0]
    return Side(70.0, rng, clock, noise), Side(70.0 * b_level, rng, clock, noise)


def test_a_five_percent_slowdown_is_caught_early_in_randomized_blocks() -> None:
    a, b = sides(1.05, noise=0.02)
    p = sq.plan(sq.Design(max_units=sq.units_needed(0.03)))
    res = ab.run_ab(a, b, p, "lower", np.random.default_rng(1))
    assert res.verdict.outcome == "regression", res.describe()
    assert res.stopped_by == "decided"
    assert len(res.a) == len(res.b) == 2 * len(res.orders) == res.verdict.runs // 2
    assert set(res.orders) <= {"ABBA", "BAAB"}
    assert a.calls == list(range(len(res.a)))  # each side's runs numbered in order
    text = res.describe()
    assert "design: interleaved A/B (randomized ABBA blocks), sequential" in text
    assert f"runs {res.verdict.runs} of {p.design.max_units * 4}" in text


def test_aa_with_drift_is_not_a_regression() -> None:
    a, b = sides(1.0)
    p = sq.plan(sq.Design(max_units=sq.units_needed(0.03)))
    res = ab.run_ab(a, b, p, "lower", np.random.default_rng(2))
    assert res.verdict.outcome in ("no change", "inconclusive"), res.describe()


def test_progress_is_told_after_every_block() -> None:
    a, b = sides(1.0)
    seen: list[tuple[int, str]] = []
    p = sq.plan(sq.Design(max_units=5))
    ab.run_ab(
        a,
        b,
        p,
        "lower",
        np.random.default_rng(3),
        on_block=lambda k, v: seen.append((k, v.outcome)),
    )
    assert [k for k, _ in seen] == list(range(1, len(seen) + 1))


def test_a_deadline_stops_with_an_inconclusive_verdict() -> None:
    a, b = sides(1.0, noise=0.2)
    p = sq.plan(sq.Design(max_units=50))
    res = ab.run_ab(a, b, p, "lower", np.random.default_rng(4), deadline_s=0.0)
    assert res.stopped_by == "deadline" and len(res.orders) == 1
    assert res.verdict.outcome == "inconclusive"


def test_a_run_without_a_value_names_its_side() -> None:
    a, _ = sides(1.0)
    p = sq.plan(sq.Design(max_units=5))
    with pytest.raises(ab.ABError, match="side B"):
        ab.run_ab(a, lambda i: float("nan"), p, "lower", np.random.default_rng(5))
