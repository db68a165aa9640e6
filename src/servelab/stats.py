"""Run-level regression statistics: a practical threshold AND significance, direction-aware.

Decision (docs/verdicts.md explains the choice and the simulation behind it):

* Each side is a list of per-run values (one per fresh measurement), never per-request values.
* The change is the ratio of geometric means, candidate / baseline, turned into "how much
  worse" by the metric's direction (throughput: lower is worse; latency: higher is worse).
* Significance: Welch's t-test on the logarithms of the run values, one-sided in the worse
  (or better) direction, at ``alpha`` (default 0.005 per direction).
* Between-session drift: the two sides come from different sessions (the baseline was
  measured hours or days earlier, on a server started anew), and a session's level moves
  as a whole (machine load, placement, a fresh server) by more than its runs scatter around
  it. ``session_cv`` (the standard deviation of a session's mean level on the log scale,
  about its CV) adds ``2 * session_cv**2`` to the variance of the difference of means;
  0 (the default) is the plain Welch test, for sides measured in one session.
* Practical size: the point estimate of the change must be at least ``threshold / 2``
  (the *practical floor*). The threshold itself (default 5 %) is the change size the suite
  is built to catch with >= 90 % power at the default run count; a true change of exactly the
  threshold has an estimate below the threshold half of the time, so gating on the threshold
  itself would cap the power at 50 % whatever the number of runs.
* With 3 % run-to-run noise that design needs 14 runs per arm (``DEFAULT_RUNS``); at 3 runs
  per arm no design meets both targets (<= 1 % A/A false alarms, >= 90 % power for 5 %).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as sps

from servelab.figures import Direction

DEFAULT_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.005
DEFAULT_POWER = 0.90
FLOOR_FRACTION = 0.5
#: Smallest per-arm run count meeting both simulation targets at 3 % noise, in both
#: directions (a 5 % throughput drop needs 13; a 5 % latency rise, log 0.049, needs 14).
DEFAULT_RUNS = 14
#: Fewest runs a baseline may be written from, and a verdict computed from.
MIN_RUNS = 3
#: Between-session drift of the embedded CPU default (cpu-smollm2 on a shared 2-core VM):
#: log-scale sd of a session's mean level. Measured spread of session means and the
#: choice of this value: docs/verdicts.md §1 ("Between-session drift").
CPU_SESSION_CV = 0.10
#: Weight of a session-drift prior, in degrees of freedom, when it is pooled with the drift
#: seen in a baseline's history (`session_drift`): worth as much as that many past sessions.
SESSION_PRIOR_DF = 8.0

Outcome = Literal["regression", "improvement", "no change", "inconclusive"]


@dataclass(frozen=True)
class Comparison:
    """The statistics of one candidate-vs-baseline comparison of one metric."""

    outcome: Outcome
    change: float | None  # candidate/baseline - 1 (signed, raw; None when not computable)
    worse_by: float | None  # the change signed so that > 0 is worse: -change for throughput
    p_worse: float | None  # one-sided p-value for "candidate is worse"
    p_better: float | None
    ci_low: float | None  # (1 - 2 alpha) confidence interval of the raw change
    ci_high: float | None
    threshold: float
    floor: float
    alpha: float
    detectable: float | None  # change detectable with DEFAULT_POWER at this noise and n
    n_baseline: int
    n_candidate: int
    reason: str = ""
    session_cv: float = 0.0  # between-session drift allowed for (log-scale sd per session)

    def describe(self, unit_direction: Direction, design: str = "stored baseline") -> str:
        """The verdict's text; it names the `design` that gave both sides (issue 19), the runs
        spent and the change they resolve."""
        if self.change is None:
            return f"{self.outcome}: {self.reason}"
        pct = f"{self.change * 100:+.1f}%"
        ci = ""
        if self.ci_low is not None and self.ci_high is not None:
            ci = f", {100 - 200 * self.alpha:.0f}% CI [{self.ci_low * 100:+.1f}%, "
            ci += f"{self.ci_high * 100:+.1f}%]"
        p = self.p_worse if self.outcome != "improvement" else self.p_better
        ptxt = "" if p is None else f", p={p:.2g}"
        better = "higher" if unit_direction == "higher" else "lower"
        drift = f", session drift {self.session_cv * 100:.1f}%" if self.session_cv else ""
        text = (
            f"{self.outcome}: change {pct}{ci}{ptxt} ({better} is better; threshold "
            f"{self.threshold * 100:.1f}%, floor {self.floor * 100:.1f}%, alpha {self.alpha:g}"
            f"{drift}, runs {self.n_candidate} vs baseline {self.n_baseline}; design: {design}"
        )
        if self.detectable is not None:
            text += f", resolves changes of about {self.detectable * 100:.1f}%"
        text += ")"
        if self.reason:
            text += f"; {self.reason}"
        return text


def _inside(low: float, high: float, threshold: float) -> bool:
    """Whether a confidence interval of the change rules out changes past the threshold
    either way (on the ratio scale: a drop of 1/(1+t) - 1 mirrors a rise of t)."""
    return high < threshold and (1.0 + low) * (1.0 + threshold) > 1.0


def _clean(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


def detectable_change(
    se: float, df: float, alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER
) -> float:
    """Smallest relative change a one-sided Welch test detects with `power` (normal-t approx)."""
    if se == 0.0:
        return 0.0
    k = float(sps.t.ppf(1 - alpha, df) + sps.t.ppf(power, df))
    return math.expm1(k * se)


def _check_drift(session_cv: float, session_df: float) -> None:
    if not (math.isfinite(session_cv) and 0 <= session_cv < 1):
        raise ValueError(
            f"session_cv must be within [0, 1) (log-scale sd of a session's level, e.g. 0.1), "
            f"got {session_cv}"
        )
    if not session_df > 0:
        raise ValueError(f"session_df must be > 0 (math.inf for a fixed prior), got {session_df}")


def compare_runs(
    baseline: Sequence[float],
    candidate: Sequence[float],
    direction: Direction,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_runs: int = MIN_RUNS,
    session_cv: float = 0.0,
    session_df: float = math.inf,
) -> Comparison:
    """Compare per-run values of one metric. Values must be positive (rates, latencies).

    `session_cv` is the between-session drift (log-scale sd of one session's mean level)
    when the two sides come from different sessions; `session_df` the degrees of freedom
    behind it (`math.inf` for a fixed prior; `session_drift` gives both from history).
    0 keeps the plain Welch test, right for two sides measured in one session.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be within (0, 1), got {threshold}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be within (0, 0.5), got {alpha}")
    _check_drift(session_cv, session_df)
    base, cand = _clean(baseline), _clean(candidate)
    floor = threshold * FLOOR_FRACTION
    nb_, nc_ = len(base), len(cand)

    def inconclusive(reason: str) -> Comparison:
        return Comparison(
            "inconclusive", None, None, None, None, None, None,
            threshold, floor, alpha, None, nb_, nc_, reason, session_cv,
        )  # fmt: skip

    if len(base) < min_runs or len(cand) < min_runs:
        return inconclusive(
            f"needs at least {min_runs} finite runs per side (baseline {len(base)}, "
            f"this run {len(cand)}); rerun with --runs {DEFAULT_RUNS}"
        )
    if min(base) <= 0 or min(cand) <= 0:
        return inconclusive("run values must be positive to compare ratios")
    a, b = np.log(np.asarray(base)), np.log(np.asarray(cand))
    na, nb = len(a), len(b)
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    drift = 2.0 * session_cv**2  # each side's session level moves independently
    diff = float(b.mean() - a.mean())
    se2 = va / na + vb / nb + drift
    change = math.expm1(diff)
    sign = -1.0 if direction == "higher" else 1.0  # worse = lower for "higher is better"
    worse_by = sign * change  # a 5 % throughput drop and a 5 % latency rise both read 0.05
    if se2 == 0.0:
        # Identical runs on both sides: any difference is exact.
        p_worse = 0.0 if sign * diff > 0 else 1.0
        p_better = 0.0 if sign * diff < 0 else 1.0
        ci_low = ci_high = change
        detectable: float | None = 0.0
    else:
        se = math.sqrt(se2)
        # Welch-Satterthwaite, with the drift term as one more variance component.
        parts = (va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1) + drift**2 / session_df
        df = se2**2 / parts if parts > 0 else math.inf
        t = sign * diff / se
        p_worse = float(sps.t.sf(t, df))
        p_better = float(sps.t.cdf(t, df))
        half = float(sps.t.ppf(1 - alpha, df)) * se
        ci_low, ci_high = math.expm1(diff - half), math.expm1(diff + half)
        detectable = detectable_change(se, df, alpha)
    reason = ""
    if p_worse < alpha and worse_by >= floor:
        outcome: Outcome = "regression"
    elif p_better < alpha and -worse_by >= floor:
        outcome = "improvement"
    else:
        outcome = "no change"
        if detectable is not None and detectable > threshold:
            if not _inside(ci_low, ci_high, threshold):
                # Neither significant nor precise: a change past the threshold is still
                # possible, so "no change" would claim what these runs did not show.
                outcome = "inconclusive"
            reason = (
                f"underpowered: at this noise and run count only changes of about "
                f"{detectable * 100:.1f}% or more are reliably caught (threshold "
                f"{threshold * 100:.1f}%); "
            )
            if drift and detectable_change(math.sqrt(drift), session_df, alpha) > threshold:
                reason += (
                    f"between-session drift ({session_cv * 100:.1f}% per session) limits it, "
                    f"so more runs do not help: compare both sides within one session"
                )
            else:
                reason += "add runs"
    return Comparison(
        outcome, change, worse_by, p_worse, p_better, ci_low, ci_high,
        threshold, floor, alpha, detectable, nb_, nc_, reason, session_cv,
    )  # fmt: skip


# --------------------------------------------------------------------------- session drift


@dataclass(frozen=True)
class SessionDrift:
    """Between-session drift of one metric: `cv` for `compare_runs(session_cv=...)`,
    `df` for `session_df`, `sessions` the past sessions that informed it."""

    cv: float
    df: float
    sessions: int


def session_drift(
    sessions: Sequence[Sequence[float]],
    *,
    prior_cv: float,
    prior_df: float = SESSION_PRIOR_DF,
) -> SessionDrift:
    """Between-session drift of one metric from its past sessions' runs, pooled with a prior.

    `sessions`: per-run values of the same metric and shape from separate sessions on the
    same stack (a baseline and its history files with the same fingerprint). The drift seen
    is the one-way random-effects estimate on log values (variance of the session means less
    the part their own run noise explains, floored at 0), on ``k - 1`` degrees of freedom;
    it is pooled with ``prior_cv`` weighted by ``prior_df`` (``math.inf``: the prior alone).
    Sessions with fewer than 2 positive finite runs are skipped.

    >>> session_drift([], prior_cv=0.05)  # no history: the prior alone
    SessionDrift(cv=0.05, df=8.0, sessions=0)
    >>> d = session_drift([[100, 101], [110, 111], [90, 91]], prior_cv=0.05)  # seen: 10 %
    >>> round(d.cv, 3), d.df, d.sessions
    (0.063, 10.0, 3)
    """
    _check_drift(prior_cv, prior_df)
    logs = [np.log(np.asarray(v)) for s in sessions if len(v := _positive(s)) >= 2]
    k = len(logs)
    if k < 2 or math.isinf(prior_df):
        return SessionDrift(prior_cv, prior_df, k)
    means = np.array([x.mean() for x in logs])
    noise = float(np.mean([x.var(ddof=1) / len(x) for x in logs]))
    seen = max(0.0, float(means.var(ddof=1)) - noise)
    df = prior_df + (k - 1)
    pooled = (prior_df * prior_cv**2 + (k - 1) * seen) / df
    return SessionDrift(math.sqrt(pooled), df, k)


def _positive(values: Sequence[float]) -> list[float]:
    return [v for v in _clean(values) if v > 0]


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class PowerResult:
    runs: int
    noise: float
    true_change: float
    trials: int
    regression_rate: float
    improvement_rate: float


def simulate(
    rng: np.random.Generator,
    *,
    runs: int,
    noise: float,
    true_change: float,
    trials: int = 1000,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    direction: Direction = "higher",
    drift: float = 0.0,
    session_cv: float = 0.0,
    session_df: float = math.inf,
) -> PowerResult:
    """Vectorized version of `compare_runs` over `trials` synthetic A/B pairs.

    Run values are log-normal with sd `noise` on the log scale (about `noise` CV); the
    candidate's true level is baseline * (1 + true_change). With `drift`, each side is a
    separate session whose level is shifted by a log-normal factor of sd `drift` (drawn
    after the runs, so `drift=0` reproduces the draws without it); `session_cv` and
    `session_df` are what the test assumes, as in `compare_runs`.
    """
    _check_drift(session_cv, session_df)
    a = rng.normal(0.0, noise, (trials, runs))
    b = rng.normal(math.log1p(true_change), noise, (trials, runs))
    if drift:
        shift = rng.normal(0.0, drift, (trials, 2))
        a, b = a + shift[:, :1], b + shift[:, 1:]
    extra = 2.0 * session_cv**2
    va, vb = a.var(axis=1, ddof=1) / runs, b.var(axis=1, ddof=1) / runs
    diff = b.mean(axis=1) - a.mean(axis=1)
    se = np.sqrt(va + vb + extra)
    df = (va + vb + extra) ** 2 / (va**2 / (runs - 1) + vb**2 / (runs - 1) + extra**2 / session_df)
    sign = -1.0 if direction == "higher" else 1.0
    t = sign * diff / se
    worse_by = sign * np.expm1(diff)
    floor = threshold * FLOOR_FRACTION
    reg = (sps.t.sf(t, df) < alpha) & (worse_by >= floor)
    imp = (sps.t.cdf(t, df) < alpha) & (-worse_by >= floor)
    return PowerResult(runs, noise, true_change, trials, float(reg.mean()), float(imp.mean()))
