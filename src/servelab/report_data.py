"""What the HTML report shows, as plain data: series of one metric family against concurrency
or prompt length, a figure's history across sessions, and per-request distributions from a
record's `raw.jsonl`. Pure functions (apart from `load_requests`); no plotting here.

A metric family is a figure's metric with the shape in its name taken off: the concurrency
sweep records `output_throughput_c1`, `output_throughput_c2`, ... and the prefill ladder
`ttft_ms_p32`, `ttft_ms_p64`, ...; the family (`output_throughput`, `ttft_ms`) is one curve
whose x axis is the figure's shape label (concurrency, prompt tokens).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from servelab.catalogue import family_of as family
from servelab.errors import RecordError
from servelab.figures import Figure

Axis = Literal["concurrency", "prompt_tokens"]
AXIS_LABEL: dict[Axis, str] = {
    "concurrency": "concurrent requests",
    "prompt_tokens": "prompt tokens",
}


def session_label(index: int, record: Mapping[str, Any]) -> str:
    s = record["session"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(s["finished_at"])))
    return f"session {index + 1} ({when})"


# --------------------------------------------------------------------------- series


@dataclass(frozen=True)
class Point:
    x: float
    value: float
    low: float  # smallest run
    high: float  # largest run
    runs: int


@dataclass(frozen=True)
class Series:
    """One curve: one session's figures of one family, unit and fixed rest-of-shape."""

    session: str
    profile: str
    family: str
    unit: str
    axis: Axis
    fixed: str  # the rest of the shape, e.g. "prompt 32, output 32, warm"
    points: tuple[Point, ...]

    @property
    def label(self) -> str:
        return f"{self.session}: {self.profile} {self.family} ({self.fixed})"


def _rest(fig: Figure, axis: Axis) -> str:
    s = fig.shape
    parts = []
    if axis != "prompt_tokens" and s.prompt_tokens is not None:
        parts.append(f"prompt {s.prompt_tokens}")
    if s.output_tokens is not None:
        parts.append(f"output {s.output_tokens}")
    if s.context_tokens is not None:
        parts.append(f"context {s.context_tokens}")
    if axis != "concurrency":
        parts.append(f"c{s.concurrency}")
    parts.append("warm" if fig.warm else "cold")
    return ", ".join(parts)


def _axis_of(figs: Sequence[Figure]) -> Axis | None:
    """The shape label that varies across one family's figures; None for a single point."""
    if len({f.shape.concurrency for f in figs}) > 1:
        return "concurrency"
    if len({f.shape.prompt_tokens for f in figs if f.shape.prompt_tokens is not None}) > 1:
        return "prompt_tokens"
    return None


def series(sessions: Sequence[tuple[str, Sequence[Figure]]]) -> list[Series]:
    """Every curve: per session, profile, family and unit, the figures along the shape label
    that varies (one series per session: two sessions never share a line)."""
    out: list[Series] = []
    for session, figures in sessions:
        families: dict[tuple[str, str, str], list[Figure]] = {}
        for f in figures:
            families.setdefault((f.identity.profile, family(f), f.unit), []).append(f)
        for (profile, fam, unit), figs in sorted(families.items()):
            axis = _axis_of(figs)
            if axis is None:
                continue
            curves: dict[str, list[Point]] = {}
            for f in figs:
                x = f.shape.concurrency if axis == "concurrency" else f.shape.prompt_tokens
                finite = [r for r in f.runs if math.isfinite(r)]
                if x is None or f.value is None or not finite:
                    continue
                point = Point(float(x), f.value, min(finite), max(finite), len(finite))
                curves.setdefault(_rest(f, axis), []).append(point)
            for fixed, points in sorted(curves.items()):
                pts = tuple(sorted(points, key=lambda p: p.x))
                out.append(Series(session, profile, fam, unit, axis, fixed, pts))
    return out


@dataclass(frozen=True)
class History:
    """One figure (profile, metric, shape, warm) across sessions: x is the session."""

    key: str
    family: str
    unit: str
    values: tuple[tuple[int, float], ...]  # (session index, median)


def history(sessions: Sequence[tuple[str, Sequence[Figure]]]) -> list[History]:
    """Figures measured in two or more sessions, in session order."""
    seen: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for i, (_, figures) in enumerate(sessions):
        for f in figures:
            if f.value is None:
                continue
            state = "warm" if f.warm else "cold"
            key = f"{f.identity.profile} {f.metric} ({f.shape.describe()}, {state})"
            seen.setdefault((key, family(f), f.unit), []).append((i, f.value))
    return [
        History(key, fam, unit, tuple(values))
        for (key, fam, unit), values in sorted(seen.items())
        if len({i for i, _ in values}) > 1
    ]


# --------------------------------------------------------------------------- requests


def load_requests(path: Path) -> list[dict[str, Any]]:
    """A record folder's `raw.jsonl` rows ([] when the record has none)."""
    folder = path if path.is_dir() else path.parent
    raw = folder / "raw.jsonl"
    try:
        text = raw.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RecordError(f"{raw}: line {n} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise RecordError(f"{raw}: line {n} is not a JSON object")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Distribution:
    """One per-request metric of one group of rows (a test at one shape)."""

    metric: str
    unit: str
    group: str
    values: tuple[float, ...]  # sorted
    failed: int  # failed requests of the group (no value)

    def pct(self, p: float) -> float:
        return float(np.percentile(np.asarray(self.values), p))


#: The per-request metrics (name, unit), in the order the report shows them.
PER_REQUEST: tuple[tuple[str, str], ...] = (
    ("TTFT", "ms"),
    ("TPOT", "ms"),
    ("ITL", "ms"),
    ("E2EL", "s"),
)


def _request_fields() -> frozenset[str]:
    from servelab.client import RequestRecord

    return frozenset(f.name for f in fields(RequestRecord))


def _as_record(row: Mapping[str, Any], names: frozenset[str]) -> Any:
    """A client RequestRecord back from its row, so the metrics are servelab.metrics' own."""
    from servelab.client import RequestRecord

    body = {k: v for k, v in row.items() if k in names}
    for k in ("chunk_ns", "chunk_tokens"):
        if isinstance(body.get(k), list):
            body[k] = tuple(body[k])
    try:
        return RequestRecord(**body)
    except TypeError:  # a row of another layout (a hand-made row, an older client)
        return None


def group_of(row: Mapping[str, Any], names: frozenset[str]) -> str:
    """The row's labels (test, concurrency, prompt length, ...), the run number left out so
    the runs of one shape pool into one distribution."""
    labels = [
        f"{k} {v}" if k != "test" else str(v)
        for k, v in row.items()
        if k not in names and k != "run" and isinstance(v, (str, int, float))
    ]
    return ", ".join(labels) or "all requests"


def distributions(rows: Sequence[Mapping[str, Any]]) -> list[Distribution]:
    """TTFT, TPOT, ITL and E2EL of every successful request, grouped by the row labels."""
    from servelab import metrics

    names = _request_fields()
    get: dict[str, Callable[[Any], list[float]]] = {
        "TTFT": lambda r: [] if (t := metrics.ttft_s(r)) is None else [1000 * t],
        "TPOT": lambda r: [] if (t := metrics.tpot_s(r)) is None else [1000 * t],
        "ITL": lambda r: [1000 * t for t in metrics.itls_s(r)],
        "E2EL": lambda r: [] if (t := metrics.e2el_s(r)) is None else [t],
    }
    values: dict[tuple[str, str], list[float]] = {}
    failed: dict[str, int] = {}
    order: list[str] = []
    for row in rows:
        rec = _as_record(row, names)
        if rec is None:
            continue
        group = group_of(row, names)
        if group not in failed:
            failed[group] = 0
            order.append(group)
        if not rec.success:
            failed[group] += 1
            continue
        for name, _ in PER_REQUEST:
            values.setdefault((name, group), []).extend(get[name](rec))
    return [
        Distribution(name, unit, group, tuple(sorted(vs)), failed[group])
        for name, unit in PER_REQUEST
        for group in order
        if (vs := values.get((name, group)))
    ]


# --------------------------------------------------------------------------- telemetry


@dataclass(frozen=True)
class TelemetryRun:
    """One measured run's accelerator telemetry, from the record's `lab.telemetry` (issue 16
    item 3): its figures summed over cards, its status, and power and memory over the run."""

    test: str  # pytest node id
    labels: str  # "run 0, concurrency 4"
    status: str  # "measured", "not measured: ...", "incomplete: ..."
    source: str
    mean_power_w: float | None
    peak_power_w: float | None
    energy_j: float | None
    energy_method: str | None
    output_tok_per_j: float | None
    peak_memory_gib: float | None
    t_s: tuple[float, ...]
    power_w: tuple[float | None, ...]  # summed over cards
    memory_gib: tuple[float | None, ...]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def telemetry_runs(record: Mapping[str, Any]) -> list[TelemetryRun]:
    """Every run's telemetry in a record (none in a record written before telemetry); a test
    with no run (not measured) appears once, with its reason."""
    out: list[TelemetryRun] = []
    for test, entry in sorted(((record.get("lab") or {}).get("telemetry") or {}).items()):
        runs = entry.get("runs") or [{"status": entry.get("status", "?")}]
        for run in runs:
            series = run.get("series") or {}
            out.append(
                TelemetryRun(
                    test=str(test),
                    labels=", ".join(f"{k} {v}" for k, v in (run.get("labels") or {}).items()),
                    status=str(run.get("status", "?")),
                    source=str(run.get("source", entry.get("source", "?"))),
                    mean_power_w=_num(run.get("mean_power_w")),
                    peak_power_w=_num(run.get("peak_power_w")),
                    energy_j=_num(run.get("energy_j")),
                    energy_method=run.get("energy_method"),
                    output_tok_per_j=_num(run.get("output_tok_per_j")),
                    peak_memory_gib=_num(run.get("peak_memory_gib")),
                    t_s=tuple(float(t) for t in series.get("t_s", ())),
                    power_w=tuple(_num(p) for p in series.get("power_w", ())),
                    memory_gib=tuple(_num(m) for m in series.get("memory_gib", ())),
                )
            )
    return out
