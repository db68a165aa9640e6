"""Capacity under SLOs: the highest load whose p-th percentile of each SLO'd latency (TTFT,
TPOT, ...) holds its bound, found by bracketing (load x factor until a level fails) and then
bisection, within a budget of levels (pure logic; the caller measures each level).

Each level says whether its percentiles hold their bounds by value, and whether the sample
also certifies them (`servelab.certify`: MLPerf LoadGen's early-stopping criterion); a
capacity found on too few requests says "held by the value, not certified at its N".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from servelab import sweeps
from servelab.certify import certify, is_certified
from servelab.errors import ConfigError
from servelab.loadgen import RunResult


@dataclass(frozen=True)
class SloCheck:
    """Whether one load level held every SLO at percentile `p`: `passed` by the percentile's
    value; `certified` when the samples also certify it (`servelab.certify`) for every SLO."""

    load: float
    passed: bool
    certified: bool
    detail: str


def slo_check(load: float, run: RunResult, slos: dict[str, float], p: float = 99.0) -> SloCheck:
    """`p` of each latency named in `slos` (ttft, tpot, itl, e2el; ms) against its bound."""
    if not slos:
        raise ConfigError("capacity: no SLOs given; set slo_ttft_ms and/or slo_tpot_ms")
    passed = certified = True
    parts: list[str] = []
    for lat, bound in slos.items():
        values = sweeps.latency_values_ms(run, lat)
        c = certify(values, p)
        under = sum(1 for v in values if v <= bound)
        ok = c.value is not None and c.value <= bound and len(values) == len(run.records)
        sure = ok and is_certified(under, len(values) - under, p)
        passed, certified = passed and ok, certified and sure
        shown = "none" if c.value is None else f"{c.value:.4g}"
        verdict = "certified" if sure else ("held" if ok else "missed")
        parts.append(f"p{p:g} {lat} {shown} ms vs {bound:g} ms ({verdict}, N = {c.n})")
    return SloCheck(load, passed, certified, f"load {load:g}: " + "; ".join(parts))


@dataclass(frozen=True)
class Capacity:
    """The highest load found to hold the SLOs (`load`; None: not even the first), the
    lowest found not to (`fails_at`; None: none failed up to the last tried), and each
    check in the order run."""

    load: float | None
    fails_at: float | None
    checks: tuple[SloCheck, ...]

    @property
    def certified(self) -> bool:
        return any(c.load == self.load and c.certified for c in self.checks)

    def describe(self, unit: str) -> str:
        spent = f"{len(self.checks)} runs"
        if self.load is None:
            return f"no capacity: the first load failed its SLOs ({spent})"
        top = (
            f"below {self.fails_at:g} {unit}"
            if self.fails_at is not None
            else "no level failed: a lower bound"
        )
        sure = "certified" if self.certified else "held by the value, not certified at its N"
        return f"capacity {self.load:g} {unit} ({sure}); {top}; {spent}"


def capacity_search(
    measure: Callable[[float], SloCheck],
    start: float,
    *,
    factor: float = 2.0,
    max_runs: int = 8,
    rel_tol: float = 0.1,
) -> Capacity:
    """Bracket (multiply the load by `factor` until a level fails), then bisect between the
    last pass and the first failure until the gap is under `rel_tol` of the pass or
    `max_runs` levels were measured. A failure at `start` ends the search."""
    if not start > 0 or not factor > 1 or max_runs < 1:
        raise ConfigError(
            f"capacity search: needs start > 0, factor > 1, max_runs >= 1 (got {start}, "
            f"{factor}, {max_runs})"
        )
    checks: list[SloCheck] = []
    good: float | None = None
    bad: float | None = None
    load = start
    while len(checks) < max_runs:
        checks.append(measure(load))
        if checks[-1].passed:
            good = load
        else:
            bad = load
        if good is None:
            break
        if bad is None:
            load = good * factor
        elif bad - good <= rel_tol * good:
            break
        else:
            load = (good + bad) / 2
    return Capacity(good, bad, tuple(checks))
