"""Sequential verdict on paired differences: stop as soon as the answer is known.

(Over 400 lines: the rule and its vectorized simulation live together, as in stats.py,
so that they cannot drift apart.)

Two sides measured in one session, interleaved (`servelab.ab`), give one log ratio
``log(B) - log(A)`` per paired unit (an ABBA block: mean of its two B runs less the mean of
its two A runs, on the log scale, which cancels a linear drift within the block). After each
unit the verdict is looked at again; looking many times at a fixed-level test inflates its
false alarms, so each look gets its own, wider boundary:

* **Group-sequential design, Lan–DeMets alpha spending** with the O'Brien–Fleming-like
  function ``alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))`` (two-sided ``alpha`` = twice
  the per-direction level), ``t`` the share of the run budget spent. Boundaries follow from
  the joint distribution of the looks (numerical integration, Armitage–McPherson–Rowe);
  almost nothing is spent early, so the last look's boundary is close to the fixed design's.
* **Repeated confidence intervals** (Jennison & Turnbull): at look ``k`` the interval
  ``mean +- c_k * se`` covers the true change at every look at once with probability
  ``>= 1 - alpha``. Every decision reads them, so every error rate holds under repeated
  looks: a false regression needs the interval above 0 when the truth is 0 (<= alpha/2), a
  false "no change" needs it inside +-threshold when the truth is at the threshold.
* The noise is estimated from the units (a t statistic on ``n - 1`` degrees of freedom): the
  normal boundary ``c_k`` becomes the t quantile of the same tail probability.

Outcomes: ``regression`` / ``improvement`` (the interval excludes 0 and the estimate is at
least the practical floor, threshold / 2, as in `servelab.stats`), ``no change`` (the
interval lies inside +-threshold), ``inconclusive`` (the budget is spent first).
docs/verdicts.md §1 ("Sequential A/B in one session") has the simulation behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

from servelab.figures import Direction
from servelab.stats import DEFAULT_ALPHA, DEFAULT_POWER, DEFAULT_THRESHOLD, FLOOR_FRACTION

SeqOutcome = Literal["regression", "improvement", "no change", "inconclusive", "continue"]
#: Units (ABBA blocks) before the first look: fewer leave the noise estimate too rough.
DEFAULT_MIN_UNITS = 4
#: Runs per unit in an ABBA block (2 of A, 2 of B).
RUNS_PER_UNIT = 4
_SQRT2PI = math.sqrt(2 * math.pi)
_GRID = 601  # points per look of the numerical integration (error << 1e-5 in alpha)


@dataclass(frozen=True)
class Design:
    """A sequential design: budget and looks in units (paired blocks), levels as in stats.

    `alpha` is per direction (a false regression, a false improvement), so the two-sided
    level spent over the looks is ``2 * alpha``.
    """

    max_units: int
    threshold: float = DEFAULT_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    min_units: int = DEFAULT_MIN_UNITS
    look_every: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be within (0, 1), got {self.threshold}")
        if not 0 < self.alpha < 0.25:
            raise ValueError(f"alpha must be within (0, 0.25) per direction, got {self.alpha}")
        if self.min_units < 3:
            raise ValueError(
                f"min_units must be at least 3 (a noise estimate), got {self.min_units}"
            )
        if self.look_every < 1:
            raise ValueError(f"look_every must be at least 1, got {self.look_every}")
        if self.max_units < self.min_units:
            raise ValueError(
                f"max_units ({self.max_units}) must be at least min_units ({self.min_units}): "
                f"raise the run budget"
            )

    @property
    def looks(self) -> tuple[int, ...]:
        """Unit counts at which the verdict is looked at; the last is the budget."""
        ns = list(range(self.min_units, self.max_units, self.look_every))
        return (*ns, self.max_units)


@dataclass(frozen=True)
class Plan:
    """A design with its boundaries: `z[k]` is the normal boundary of look `looks[k]`."""

    design: Design
    looks: tuple[int, ...]
    z: tuple[float, ...]

    def boundary(self, n: int) -> float | None:
        """The t boundary for a look at `n` units; None where `n` is no planned look."""
        if n not in self.looks:
            return None
        z = self.z[self.looks.index(n)]
        return t_boundary(z, n - 1)


def obf_spending(t: float, alpha2: float) -> float:
    """Lan–DeMets O'Brien–Fleming-like spending: two-sided alpha spent by information `t`."""
    if t <= 0:
        return 0.0
    return float(2.0 - 2.0 * sps.norm.cdf(sps.norm.ppf(1 - alpha2 / 2) / math.sqrt(min(t, 1.0))))


def spending_boundaries(fractions: Sequence[float], alpha2: float) -> tuple[float, ...]:
    """Two-sided normal boundaries c_k at information fractions `fractions` (increasing,
    last <= 1) spending `alpha2` by `obf_spending`: P(|Z_j| < c_j for j < k, |Z_k| >= c_k)
    equals the alpha spent between looks k-1 and k (exact up to the integration grid)."""
    out: list[float] = []
    prev_t, spent = 0.0, 0.0
    grid: np.ndarray | None = None  # S = sqrt(t) * Z on the continuation region
    dens: np.ndarray | None = None  # sub-density of S there (paths not yet stopped)
    for t in fractions:
        if not prev_t < t <= 1.0 + 1e-12:
            raise ValueError(f"information fractions must increase within (0, 1], got {fractions}")
        target = obf_spending(t, alpha2) - spent
        sd = math.sqrt(t - prev_t)
        w = None if grid is None or dens is None else _weights(grid) * dens
        top = 40.0 * math.sqrt(t)
        if target <= 1e-14 or _crossing(top, sd, grid, w) >= target:
            b = top  # nothing to spend here: an unreachable boundary
        else:
            b = float(
                optimize.brentq(lambda x, s=sd, g=grid, v=w, a=target: _crossing(x, s, g, v) - a,
                                1e-9, top)
            )  # fmt: skip
        spent += _crossing(b, sd, grid, w)
        new = np.linspace(-b, b, _GRID)
        if grid is None or dens is None:
            dens = np.exp(-0.5 * (new / sd) ** 2) / (sd * _SQRT2PI)
        else:
            kernel = np.exp(-0.5 * ((new[:, None] - grid[None, :]) / sd) ** 2) / (sd * _SQRT2PI)
            dens = kernel @ (_weights(grid) * dens)
        grid = new
        out.append(b / math.sqrt(t))
        prev_t = t
    return tuple(out)


def _crossing(b: float, sd: float, grid: np.ndarray | None, w: np.ndarray | None) -> float:
    """P(|S| >= b) after a N(0, sd^2) step from the weighted sub-density `w` on `grid`
    (from 0 at the first look)."""
    if grid is None or w is None:
        return float(2.0 * special.ndtr(-b / sd))
    return float(np.sum(w * (special.ndtr((grid - b) / sd) + special.ndtr((-b - grid) / sd))))


def _weights(grid: np.ndarray) -> np.ndarray:
    """Simpson weights on an even grid with an odd number of points."""
    h = float(grid[1] - grid[0])
    w = np.ones(len(grid))
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * h / 3.0


def plan(design: Design) -> Plan:
    """Compute the design's boundaries once (pure; a few hundred ms for 100 looks)."""
    looks = design.looks
    z = spending_boundaries([n / design.max_units for n in looks], 2 * design.alpha)
    return Plan(design, looks, z)


def t_boundary(z: float, df: float) -> float:
    """The t quantile with the normal boundary's one-sided tail probability."""
    tail = float(sps.norm.sf(z))
    return float(sps.t.isf(tail, df)) if tail > 0 else math.inf


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class SequentialVerdict:
    """Where a sequential comparison stands after `units` paired units."""

    outcome: SeqOutcome
    change: float | None  # B/A - 1 (geometric), None before the first look
    ci_low: float | None  # repeated confidence interval of the change at this look
    ci_high: float | None
    units: int
    runs: int  # measured runs spent, both sides together
    max_runs: int
    resolvable: float | None  # change caught with DEFAULT_POWER at this noise and n
    resolvable_at_budget: float | None  # the same with the whole budget spent
    threshold: float
    alpha: float
    direction: Direction

    @property
    def decided(self) -> bool:
        return self.outcome != "continue"

    def describe(self, design_name: str = "interleaved A/B, sequential") -> str:
        """One line: outcome, change and interval, the design, runs spent, what it resolves."""
        better = "higher" if self.direction == "higher" else "lower"
        head = f"{self.outcome}"
        if self.change is not None and self.ci_low is not None and self.ci_high is not None:
            head += (
                f": change B vs A {self.change * 100:+.1f}%, repeated "
                f"{100 - 200 * self.alpha:.0f}% CI [{self.ci_low * 100:+.1f}%, "
                f"{self.ci_high * 100:+.1f}%]"
            )
        text = (
            f"{head} ({better} is better; design: {design_name}, O'Brien-Fleming alpha "
            f"spending; threshold {self.threshold * 100:.1f}%, alpha {self.alpha:g} per "
            f"direction; runs {self.runs} of {self.max_runs}"
        )
        if self.resolvable is not None:
            text += f", resolves changes of about {self.resolvable * 100:.1f}%"
        text += ")"
        if self.outcome == "inconclusive" and self.resolvable_at_budget is not None:
            text += (
                f"; undecided: at this noise the whole budget resolves "
                f"about {self.resolvable_at_budget * 100:.1f}%; raise the budget or quiet the host"
            )
        return text


def log_ratios(a: Sequence[float], b: Sequence[float], per_unit: int = 2) -> list[float]:
    """Paired log ratios per unit: `a` and `b` are the runs in measurement order, `per_unit`
    of each side per unit (2 for ABBA blocks); mean log B less mean log A per unit.

    >>> [round(x, 4) for x in log_ratios([10, 10, 20, 20], [11, 11, 22, 22])]
    [0.0953, 0.0953]
    """
    if len(a) != len(b) or len(a) % per_unit:
        raise ValueError(
            f"paired runs must come in whole units of {per_unit} a side "
            f"(got {len(a)} A and {len(b)} B runs)"
        )
    if min([*a, *b], default=1.0) <= 0 or not all(math.isfinite(x) for x in [*a, *b]):
        raise ValueError("run values must be positive and finite to compare ratios")
    la, lb = np.log(np.asarray(a, float)), np.log(np.asarray(b, float))
    d = lb.reshape(-1, per_unit).mean(axis=1) - la.reshape(-1, per_unit).mean(axis=1)
    return [float(x) for x in d]


def decide(
    p: Plan,
    diffs: Sequence[float],
    direction: Direction,
    runs_per_unit: int = RUNS_PER_UNIT,
    *,
    final: bool = False,
) -> SequentialVerdict:
    """The verdict after the units in `diffs` (log ratios B vs A, `log_ratios`).

    ``continue`` between planned looks and while nothing is decided; at the last planned
    look an undecided comparison is ``inconclusive``. Units past the budget are ignored.
    `final` ends the comparison here (a deadline): this look is read as the last one,
    with the boundary of the latest planned look (stopping early leaves alpha unspent, so
    the error rates still hold).
    """
    d = p.design
    n = min(len(diffs), d.max_units)
    z_end = p.z[-1]
    if final and n >= p.looks[0] and n not in p.looks:
        latest = max(k for k in p.looks if k <= n)
        p = Plan(d, (*p.looks, n), (*p.z, p.z[p.looks.index(latest)]))
    max_runs = d.max_units * runs_per_unit

    def verdict(outcome: SeqOutcome, **kw: float | None) -> SequentialVerdict:
        return SequentialVerdict(
            outcome, kw.get("change"), kw.get("low"), kw.get("high"), n, n * runs_per_unit,
            max_runs, kw.get("res"), kw.get("res_budget"), d.threshold, d.alpha, direction,
        )  # fmt: skip

    c = p.boundary(n)
    if c is None:
        return verdict("inconclusive" if final else "continue")
    x = np.asarray(diffs[:n], float)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    se = sd / math.sqrt(n)
    half = c * se if se > 0 else 0.0
    lo, hi = mean - half, mean + half
    z_pow = float(sps.norm.ppf(DEFAULT_POWER))
    res = math.expm1((c + z_pow) * se) if math.isfinite(c) else None
    c_end = t_boundary(z_end, d.max_units - 1)
    res_budget = math.expm1((c_end + z_pow) * sd / math.sqrt(d.max_units))
    sign = -1.0 if direction == "higher" else 1.0  # > 0 is worse
    worse_by = sign * math.expm1(mean)
    floor = d.threshold * FLOOR_FRACTION
    lim = math.log1p(d.threshold)
    outcome: SeqOutcome
    excludes_zero = lo > 0 or hi < 0  # the estimate lies inside: same side as the change
    if excludes_zero and worse_by >= floor:
        outcome = "regression"
    elif excludes_zero and -worse_by >= floor:
        outcome = "improvement"
    elif -lim < lo and hi < lim:
        outcome = "no change"
    elif n >= d.max_units or final:
        outcome = "inconclusive"
    else:
        outcome = "continue"
    return verdict(
        outcome,
        change=math.expm1(mean),
        low=math.expm1(lo),
        high=math.expm1(hi),
        res=res,
        res_budget=res_budget,
    )


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SimResult:
    noise: float
    true_change: float
    max_units: int
    trials: int
    regression: float
    improvement: float
    no_change: float
    inconclusive: float
    mean_runs: float  # both sides together
    p90_runs: float


def units_needed(
    noise: float, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA
) -> int:
    """A unit budget giving >= 90 % power for a change of `threshold` at run noise `noise`
    (log-scale sd per run, about its CV): the fixed design's count, 10 % more for the looks
    and 4 more for the t statistic's few degrees of freedom early on (checked by simulation,
    docs/verdicts.md).

    >>> units_needed(0.03), units_needed(0.10)
    (11, 73)
    """
    z = float(sps.norm.isf(alpha) + sps.norm.ppf(DEFAULT_POWER))
    fixed = (z * noise / math.log1p(threshold)) ** 2  # an ABBA unit's sd is the run's
    return max(DEFAULT_MIN_UNITS, math.ceil(1.1 * fixed) + DEFAULT_MIN_UNITS)


def decide_many(p: Plan, diffs: np.ndarray, direction: Direction) -> tuple[np.ndarray, np.ndarray]:
    """`decide` over rows of unit log ratios (trials x units, all `max_units` measured):
    each row's outcome code (0 regression, 1 improvement, 2 no change, 3 inconclusive) and
    the units spent when it stopped."""
    d = p.design
    units = d.max_units
    trials = diffs.shape[0]
    csum, csq = np.cumsum(diffs, axis=1), np.cumsum(diffs**2, axis=1)
    sign = -1.0 if direction == "higher" else 1.0
    floor, lim = d.threshold * FLOOR_FRACTION, math.log1p(d.threshold)
    outcome = np.full(trials, 4)  # 4: still open
    spent = np.full(trials, units)
    for n, z in zip(p.looks, p.z, strict=True):
        mean = csum[:, n - 1] / n
        var = np.maximum(csq[:, n - 1] - n * mean**2, 0.0) / (n - 1)
        half = t_boundary(z, n - 1) * np.sqrt(var / n)
        lo, hi = mean - half, mean + half
        worse = sign * np.expm1(mean)
        excl = (lo > 0) | (hi < 0)
        now = np.select(
            [excl & (worse >= floor), excl & (-worse >= floor), (-lim < lo) & (hi < lim)],
            [0, 1, 2],
            default=3 if n == units else 4,
        )
        new = (outcome == 4) & (now != 4)
        outcome = np.where(new, now, outcome)
        spent = np.where(new, n, spent)
    return outcome, spent


def simulate(
    p: Plan,
    rng: np.random.Generator,
    *,
    noise: float,
    true_change: float,
    trials: int = 2000,
    direction: Direction = "lower",
    drift: float = 0.0,
) -> SimResult:
    """Vectorized `decide` over `trials` interleaved A/B comparisons.

    Each run is log-normal with sd `noise`; B's level is A's times (1 + true_change); runs
    come in ABBA / BAAB blocks (order drawn per block) and, with `drift`, the session's level
    takes a random walk of sd `drift` per run that both sides share.
    """
    units = p.design.max_units
    order = rng.integers(0, 2, (trials, units))  # 0: ABBA, 1: BAAB
    runs = rng.normal(0.0, noise, (trials, units * 4))
    if drift:
        runs += np.cumsum(rng.normal(0.0, drift, (trials, units * 4)), axis=1)
    runs = runs.reshape(trials, units, 4)
    b_pos = np.where(order[..., None] == 0, [False, True, True, False], [True, False, False, True])
    b_mean = np.where(b_pos, runs, 0.0).sum(axis=2) / 2 + math.log1p(true_change)
    a_mean = np.where(~b_pos, runs, 0.0).sum(axis=2) / 2
    outcome, spent = decide_many(p, b_mean - a_mean, direction)
    total = spent * RUNS_PER_UNIT
    reg, imp, same, undecided = (float((outcome == k).mean()) for k in range(4))
    return SimResult(
        noise, true_change, units, trials, reg, imp, same, undecided,
        float(total.mean()), float(np.percentile(total, 90)),
    )  # fmt: skip
