"""The report's load curves, read back from a session's figures (issue 17 via issue 24's
report): the latency-throughput curve of an open-loop rate sweep with its knee, and each
capacity search's levels against its SLOs. Pure functions over `Figure`s, no plotting.

A rate sweep records, per offered rate `r` (milli-requests per second in the name),
`achieved_rps_r{r}` and percentile latencies `p{q}_{lat}_ms_r{r}`, and the knee as
`knee_rate_rps` (`perf/test_rate_sweep.py`). A capacity search records `capacity_rps`,
whose notes carry the SLOs ("SLOs at p99: TTFT <= 1000 ms, ...") and each level it tried
("search 1, load 2: p99 ttft 459.7 ms vs 1000 ms (held, N = 6); ..."; `servelab.capacity`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from servelab.figures import Figure

_ACHIEVED = re.compile(r"^achieved_rps_r(\d+)$")
_LATENCY = re.compile(r"^p(\d+)_(ttft|tpot|itl|e2el)_ms_r(\d+)$")
_SLO = re.compile(r"\b(TTFT|TPOT|ITL|E2EL) <= ([0-9.]+) ms")
_LEVEL = re.compile(r"^search (\d+), load ([0-9.e+-]+): (.*)$")
_CHECK = re.compile(r"p([0-9.]+) (\w+) ([0-9.e+-]+|none) ms vs ([0-9.]+) ms \((\w+), N = (\d+)\)")


@dataclass(frozen=True)
class SweepPoint:
    """One offered rate: the achieved rate and each latency percentile (median of runs)."""

    offered_rps: float
    achieved_rps: float
    latency_ms: dict[str, float]  # "p50 e2el" -> ms


@dataclass(frozen=True)
class Sweep:
    session: str
    profile: str
    points: tuple[SweepPoint, ...]  # by offered rate
    knee_rps: float | None  # the knee figure's value (None: not recorded or NaN)

    def knee_point(self) -> SweepPoint | None:
        """The sweep's point at the knee's offered rate, where one was measured."""
        if self.knee_rps is None:
            return None
        return next((p for p in self.points if math.isclose(p.offered_rps, self.knee_rps)), None)


def _value(f: Figure) -> float | None:
    v = f.value
    return v if v is not None and math.isfinite(v) else None


def sweeps(session: str, figures: Sequence[Figure]) -> list[Sweep]:
    """Each profile's rate sweep in one session's figures (none without achieved rates)."""
    by_profile: dict[str, list[Figure]] = {}
    for f in figures:
        by_profile.setdefault(f.identity.profile, []).append(f)
    out = []
    for profile, figs in sorted(by_profile.items()):
        achieved: dict[int, float] = {}
        lat: dict[int, dict[str, float]] = {}
        knee = None
        for f in figs:
            v = _value(f)
            if f.metric == "knee_rate_rps":
                knee = v
            elif v is not None and (m := _ACHIEVED.match(f.metric)):
                achieved[int(m.group(1))] = v
            elif v is not None and (m := _LATENCY.match(f.metric)):
                q = "99.9" if m.group(1) == "999" else m.group(1)
                lat.setdefault(int(m.group(3)), {})[f"p{q} {m.group(2)}"] = v
        if not achieved:
            continue
        points = tuple(SweepPoint(r / 1000, achieved[r], lat.get(r, {})) for r in sorted(achieved))
        out.append(Sweep(session, profile, points, knee))
    return out


@dataclass(frozen=True)
class Level:
    """One load a capacity search tried: each SLO'd percentile against its bound."""

    search: int
    load_rps: float
    values_ms: dict[str, float | None]  # "p99 ttft" -> ms (None: no sample)
    verdicts: dict[str, str]  # "p99 ttft" -> certified | held | missed


@dataclass(frozen=True)
class CapacityCurve:
    session: str
    profile: str
    slos_ms: dict[str, float]  # "ttft" -> bound
    levels: tuple[Level, ...]
    capacity_rps: float | None  # the figure's value (median over searches)


def capacity_curves(session: str, figures: Sequence[Figure]) -> list[CapacityCurve]:
    """Each `capacity_rps` figure's SLOs and levels, read from its notes."""
    out = []
    for f in figures:
        if f.metric != "capacity_rps":
            continue
        slos: dict[str, float] = {}
        levels = []
        for note in f.notes:
            if note.startswith("SLOs at"):
                slos.update((k.lower(), float(v)) for k, v in _SLO.findall(note))
            m = _LEVEL.match(note)
            if m is None:
                continue
            values: dict[str, float | None] = {}
            verdicts: dict[str, str] = {}
            for p, lat, v, _bound, verdict, _n in _CHECK.findall(m.group(3)):
                key = f"p{p} {lat}"
                values[key] = None if v == "none" else float(v)
                verdicts[key] = verdict
            levels.append(Level(int(m.group(1)), float(m.group(2)), values, verdicts))
        out.append(CapacityCurve(session, f.identity.profile, slos, tuple(levels), _value(f)))
    return out
