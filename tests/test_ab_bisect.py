"""Bisect over stand-in builds: each build adds a per-token delay (as the live test's proxy
does) to a 70 ms TPOT with 3 % run noise; the A/B machinery finds the first slow one."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import pytest

from servelab import metrics
from servelab import sequential as sq
from servelab.ab import Measure
from servelab.ab_bisect import BisectError, Build, bisect_builds
from servelab.client import completion_payload
from servelab.delay_proxy import delayed
from servelab.loadgen import run_requests
from servelab.server import Endpoint
from tests.fakes.scripted_server import ScriptedServer

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


def test_bisect_over_proxy_delayed_builds_of_a_scripted_server() -> None:
    """Stand-in builds as `perf/test_ab.py --ab-bisect` makes them: the scripted server
    (10 ms a token, exact) straight (the reference, build 1) and through the delaying proxy
    (builds 2-3 add 3 ms a token: +30 % TPOT). The real client measures each run's median
    TPOT; the bisect finds build 2, and the record's dict names it."""
    with ScriptedServer(0.002, 0.010) as s, contextlib.ExitStack() as stack:
        a = Endpoint(base_url=f"http://127.0.0.1:{s.port}", model="scripted")
        delays = [0.0, 0.0, 0.003, 0.003]
        builds = [Build(i, f"+{d * 1000:g} ms/token") for i, d in enumerate(delays)]

        def measure_of(build: Build) -> Measure:
            endpoint = stack.enter_context(delayed(a, delays[build.index]))

            def one(i: int) -> float:
                payload = completion_payload("scripted", f"run {build.index} {i}", 8)
                res = run_requests(endpoint, [payload], progress=False, timeout_s=10)
                m = metrics.compute(res.records, res.start_ns, res.end_ns)
                assert m.tpot_ms is not None
                return float(m.tpot_ms.median)

            return one

        # "No change" within +-15 %: enough to tell +30 % apart, decided in a few blocks.
        plan = sq.plan(sq.Design(max_units=25, threshold=0.15))
        rng = np.random.default_rng(5)
        res = bisect_builds(builds, measure_of, plan, "lower", rng)
    assert res.first_bad == 2 and res.last_good == 1, res.describe()
    assert [st.index for st in res.steps] == [3, 1, 2]
    outcomes = [st.result.verdict.outcome for st in res.steps]
    assert outcomes == ["regression", "no change", "regression"]
    d = res.to_dict()
    assert d["first_bad_build"] == "+3 ms/token" and d["answered"] is True
    assert d["builds"][2] == "+3 ms/token" and len(d["steps"]) == 3
    assert "first regressed build: #2 +3 ms/token (last unchanged: #1 +0 ms/token)" in d["summary"]


def test_an_undecided_bisect_is_not_answered() -> None:
    rng = np.random.default_rng(3)
    tiny = sq.plan(sq.Design(max_units=5))
    res = bisect_builds([0.0, 0.0, 1.75, 14.0, 14.0], stand_in(rng), tiny, "lower", rng)
    assert not res.answered and res.to_dict()["first_bad_build"] is None
    nothing = bisect_builds([0.0] * 3, stand_in(rng), PLAN, "lower", rng)
    assert nothing.answered and nothing.first_bad is None  # unchanged throughout: an answer


def test_a_single_build_cannot_be_bisected() -> None:
    with pytest.raises(ValueError, match="reference and at least one later build") as info:
        bisect_builds(
            [0.0], stand_in(np.random.default_rng(0)), PLAN, "lower", np.random.default_rng(0)
        )
    assert isinstance(info.value, BisectError)  # a ServelabError too
