"""Between-session drift in the verdict statistics (issue 15 item 3).

A baseline and the run judged against it come from different sessions: a server started
anew, hours apart, on a machine whose load has changed. Each session's level moves as a
whole, so three runs a side are not independent draws of one distribution. These tests
prove, by simulation in the style of tests/test_stats.py, that `compare_runs(session_cv=...)`
keeps A/A false alarms at <= 1 % when sessions drift, while a doubling still fails at 3 runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from servelab.figures import Direction
from servelab.stats import (
    CPU_SESSION_CV,
    SESSION_PRIOR_DF,
    compare_runs,
    session_drift,
    simulate,
)

# The issue's false alarm, rebuilt: 3 vs 3 TTFT runs (ms) whose plain Welch test reads
# "+12.3 %, 99 % CI [+2.2 %, +23.5 %], p = 0.0024".
ISSUE_BASELINE = [243.8, 250.0, 256.4]
ISSUE_CANDIDATE = [273.8, 280.8, 287.9]


def test_the_issues_false_alarm_is_a_regression_without_drift_and_not_with_it() -> None:
    plain = compare_runs(ISSUE_BASELINE, ISSUE_CANDIDATE, "lower")
    assert plain.outcome == "regression"
    assert plain.change == pytest.approx(0.123, abs=0.001)
    assert plain.p_worse == pytest.approx(0.0024, abs=0.0001)
    drift = compare_runs(ISSUE_BASELINE, ISSUE_CANDIDATE, "lower", session_cv=CPU_SESSION_CV)
    # Was "no change" (issue 19's defect): not significant, and its CI reaches past +5 %.
    assert drift.outcome == "inconclusive"
    assert drift.change == plain.change  # the estimate is the same; only its error grows
    assert drift.ci_low is not None and plain.ci_low is not None
    assert drift.ci_low < plain.ci_low
    assert "session drift 10.0%" in drift.describe("lower")
    assert "more runs do not help" in drift.reason


def test_a_doubling_still_fails_at_three_runs_with_drift() -> None:
    doubled = [2 * x for x in ISSUE_BASELINE]
    c = compare_runs(ISSUE_BASELINE, doubled, "lower", session_cv=CPU_SESSION_CV)
    assert c.outcome == "regression"
    halved = [x / 2 for x in ISSUE_BASELINE]
    assert compare_runs(ISSUE_BASELINE, halved, "higher", session_cv=0.1).outcome == "regression"


def test_zero_drift_is_todays_test() -> None:
    base, cand = [100.0, 103.0, 98.0, 101.0], [91.0, 93.0, 90.0, 92.5]
    assert compare_runs(base, cand, "higher") == compare_runs(base, cand, "higher", session_cv=0)


def test_identical_runs_with_drift_use_the_drift_alone() -> None:
    # No run noise: the difference's error is the drift's, on the prior's (infinite) df.
    c = compare_runs([5, 5, 5], [6, 6, 6], "lower", session_cv=0.05)
    z = math.log(6 / 5) / math.sqrt(2 * 0.05**2)
    assert c.p_worse == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-9)
    assert c.outcome == "regression"


def test_finite_session_df_widens_the_interval() -> None:
    known = compare_runs(ISSUE_BASELINE, ISSUE_CANDIDATE, "lower", session_cv=0.05)
    learned = compare_runs(ISSUE_BASELINE, ISSUE_CANDIDATE, "lower", session_cv=0.05, session_df=3)
    assert known.ci_high is not None and learned.ci_high is not None
    assert learned.ci_high > known.ci_high
    assert learned.p_worse is not None and known.p_worse is not None
    assert learned.p_worse > known.p_worse


@pytest.mark.parametrize(("cv", "df"), [(-0.1, math.inf), (1.5, math.inf), (math.nan, 1.0)])
def test_bad_drift_is_rejected(cv: float, df: float) -> None:
    with pytest.raises(ValueError, match="session_cv"):
        compare_runs([1, 2, 3], [1, 2, 3], "higher", session_cv=cv, session_df=df)
    with pytest.raises(ValueError, match="session_df"):
        compare_runs([1, 2, 3], [1, 2, 3], "higher", session_cv=0.1, session_df=0)


def test_vectorized_simulation_with_drift_matches_the_scalar_rule() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(0, 0.08, (200, 3))
    b = rng.normal(0, 0.08, (200, 3))
    shift = rng.normal(0, 0.12, (200, 2))
    a, b = a + shift[:, :1], b + shift[:, 1:]
    scalar = [
        compare_runs(
            np.exp(x).tolist(), np.exp(y).tolist(), "lower", session_cv=0.1, session_df=12.0
        ).outcome
        for x, y in zip(a, b, strict=True)
    ]
    sim = simulate(
        np.random.default_rng(5),
        runs=3,
        noise=0.08,
        true_change=0.0,
        trials=200,
        direction="lower",
        drift=0.12,
        session_cv=0.1,
        session_df=12.0,
    )
    assert sim.regression_rate == pytest.approx(scalar.count("regression") / 200)
    assert sim.improvement_rate == pytest.approx(scalar.count("improvement") / 200)


# ------------------------------------------------------------------ the targets, simulated

NOISES = (0.03, 0.10, 0.15)  # run-to-run noise within a session: quiet host .. loaded CPU


@pytest.mark.parametrize("direction", ["higher", "lower"])
@pytest.mark.parametrize("noise", [0.03, 0.10])
def test_session_drift_makes_plain_welch_cry_wolf(noise: float, direction: Direction) -> None:
    """The bug, simulated: sessions that drift by the CPU default's 10 % make the plain test
    raise false alarms above 1 % (19 % at 3 % run noise, 2.5 % at 10 %; at 15 % run noise
    the drift is lost in the runs' own scatter, ~1 %)."""
    aa = simulate(
        np.random.default_rng(21),
        runs=3,
        noise=noise,
        true_change=0.0,
        trials=20_000,
        direction=direction,
        drift=CPU_SESSION_CV,
    )
    assert aa.regression_rate > 0.01


@pytest.mark.parametrize("direction", ["higher", "lower"])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("session_df", [math.inf, SESSION_PRIOR_DF])
def test_aa_false_alarms_stay_at_most_1pct_with_session_drift(
    noise: float, direction: Direction, session_df: float
) -> None:
    """A/A with true drift = the prior, 3 vs 3, 20,000 trials: <= 1 % false alarms (either
    way), whether the prior is taken as known or as worth SESSION_PRIOR_DF sessions."""
    for drift in (0.0, 0.5 * CPU_SESSION_CV, CPU_SESSION_CV):
        aa = simulate(
            np.random.default_rng(22),
            runs=3,
            noise=noise,
            true_change=0.0,
            trials=20_000,
            direction=direction,
            drift=drift,
            session_cv=CPU_SESSION_CV,
            session_df=session_df,
        )
        assert aa.regression_rate <= 0.01, (drift, aa)
        assert aa.improvement_rate <= 0.01, (drift, aa)


@pytest.mark.parametrize("direction", ["higher", "lower"])
@pytest.mark.parametrize("noise", [0.03, 0.10])
def test_a_doubling_fails_at_three_runs_despite_drift(noise: float, direction: Direction) -> None:
    """+100 % latency (or a halved throughput) with true drift = the prior, 3 vs 3, 20,000
    trials: caught in >= 90 %. At 15 % run noise it is ~75 % (docs/verdicts.md)."""
    worse = 1.0 if direction == "lower" else -0.5
    ab = simulate(
        np.random.default_rng(23),
        runs=3,
        noise=noise,
        true_change=worse,
        trials=20_000,
        direction=direction,
        drift=CPU_SESSION_CV,
        session_cv=CPU_SESSION_CV,
    )
    assert ab.regression_rate >= 0.90


# ------------------------------------------------------------------ learning from history


def test_no_history_gives_the_prior() -> None:
    d = session_drift([], prior_cv=0.1)
    assert (d.cv, d.df, d.sessions) == (0.1, SESSION_PRIOR_DF, 0)
    one = session_drift([[1.0, 2.0, 3.0]], prior_cv=0.1)
    assert (one.cv, one.sessions) == (0.1, 1)


def test_history_drift_is_estimated_and_pooled_with_the_prior() -> None:
    rng = np.random.default_rng(31)
    levels = rng.normal(0, 0.2, 400)  # true drift 20 %, run noise 5 %, 4 runs a session
    sessions = [np.exp(lv + rng.normal(0, 0.05, 4)).tolist() for lv in levels]
    alone = session_drift(sessions, prior_cv=0.0, prior_df=1e-9)
    assert alone.cv == pytest.approx(0.2, rel=0.1)
    pooled = session_drift(sessions[:9], prior_cv=0.1, prior_df=8.0)
    assert pooled.df == 16.0 and pooled.sessions == 9
    fixed = session_drift(sessions, prior_cv=0.1, prior_df=math.inf)
    assert fixed.cv == 0.1 and fixed.df == math.inf


def test_history_without_drift_shrinks_towards_zero_and_skips_short_sessions() -> None:
    flat = [[100.0, 102.0, 98.0]] * 10 + [[5.0], [float("nan"), 7.0], [0.0, -1.0]]
    d = session_drift(flat, prior_cv=0.1, prior_df=8.0)
    assert d.sessions == 10
    assert d.cv == pytest.approx(math.sqrt(8 * 0.01 / 17))
