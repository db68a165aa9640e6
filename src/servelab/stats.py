"""Run-level regression statistics: a practical threshold AND significance, direction-aware.

Decision (docs/verdicts.md explains the choice and the simulation behind it):

* Each side is a list of per-run values (one per fresh measurement), never per-request values.
* The change is the ratio of geometric means, candidate / baseline, turned into "how much
  worse" by the metric's direction (throughput: lower is worse; latency: higher is worse).
* Significance: Welch's t-test on the logarithms of the run values, one-sided in the worse
  (or better) direction, at ``alpha`` (default 0.005 per direction).
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

    def describe(self, unit_direction: Direction) -> str:
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
        text = (
            f"{self.outcome}: change {pct}{ci}{ptxt} ({better} is better; threshold "
            f"{self.threshold * 100:.1f}%, floor {self.floor * 100:.1f}%, alpha {self.alpha:g}, "
            f"runs {self.n_candidate} vs baseline {self.n_baseline})"
        )
        if self.reason:
            text += f"; {self.reason}"
        return text


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


def compare_runs(
    baseline: Sequence[float],
    candidate: Sequence[float],
    direction: Direction,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_runs: int = MIN_RUNS,
) -> Comparison:
    """Compare per-run values of one metric. Values must be positive (rates, latencies)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be within (0, 1), got {threshold}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be within (0, 0.5), got {alpha}")
    base, cand = _clean(baseline), _clean(candidate)
    floor = threshold * FLOOR_FRACTION
    nb_, nc_ = len(base), len(cand)

    def inconclusive(reason: str) -> Comparison:
        return Comparison(
            "inconclusive", None, None, None, None, None, None,
            threshold, floor, alpha, None, nb_, nc_, reason,
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
    diff = float(b.mean() - a.mean())
    se2 = va / na + vb / nb
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
        df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if (va or vb) else 1
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
            reason = (
                f"underpowered: at this noise and run count only changes of about "
                f"{detectable * 100:.1f}% or more are reliably caught (threshold "
                f"{threshold * 100:.1f}%); add runs"
            )
    return Comparison(
        outcome, change, worse_by, p_worse, p_better, ci_low, ci_high,
        threshold, floor, alpha, detectable, nb_, nc_, reason,
    )  # fmt: skip


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
) -> PowerResult:
    """Vectorized version of `compare_runs` over `trials` synthetic A/B pairs.

    Run values are log-normal with sd `noise` on the log scale (about `noise` CV); the
    candidate's true level is baseline * (1 + true_change).
    """
    a = rng.normal(0.0, noise, (trials, runs))
    b = rng.normal(math.log1p(true_change), noise, (trials, runs))
    va, vb = a.var(axis=1, ddof=1) / runs, b.var(axis=1, ddof=1) / runs
    diff = b.mean(axis=1) - a.mean(axis=1)
    se = np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (runs - 1) + vb**2 / (runs - 1))
    sign = -1.0 if direction == "higher" else 1.0
    t = sign * diff / se
    worse_by = sign * np.expm1(diff)
    floor = threshold * FLOOR_FRACTION
    reg = (sps.t.sf(t, df) < alpha) & (worse_by >= floor)
    imp = (sps.t.cdf(t, df) < alpha) & (-worse_by >= floor)
    return PowerResult(runs, noise, true_change, trials, float(reg.mean()), float(imp.mean()))
