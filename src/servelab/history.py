"""Change points over history: every record of a (host key, profile) is one point in a series
per figure; a change point is where the series' level moved, attributed to what changed in
the stack there (engine version, servelab commit, patch set, model, arguments).

Detection is Apache Otava's (`apache-otava` 0.8.0, `otava.analysis.compute_change_points`):
the Hunter algorithm of Fleming et al. (ICPE 2023), E-Divisive means (Matteson and James) in
sliding windows, each candidate kept only when a Student t-test between its neighbouring
segments gives p < `max_pvalue` (deterministic: no permutation test). Otava is installed
without its declared dependencies (`pip install --no-deps apache-otava==0.8.0`): its analysis
modules need only numpy and scipy, while its declared ones (BigQuery, Postgres and Slack
clients; numpy pinned to 2.2.0) would replace the stack's numpy.

Annotated baseline resets (as Conbench's) cut a series: detection runs on each part alone,
and each reset is printed with its reason. A resets file (TOML or JSON)::

    [[reset]]
    profile = "cpu-smollm2"          # optional: every profile
    host = "cpu-..."                 # optional: every host
    figure = "decode_tok_s"          # optional: a figure key or its prefix; every figure
    at = "2026-12-01T00:00:00Z"      # or a record folder's name: the first point after it
    reason = "moved to vLLM 0.33 (expected +8 % decode)"
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from servelab.certify import invalid_note
from servelab.errors import ConfigError, RecordError
from servelab.files import read_json, read_toml
from servelab.record_files import load_record

#: Otava's defaults: a change point needs p < 0.001; windows of 50 points.
MAX_PVALUE = 0.001
WINDOW = 50
#: What may change along a series, read from each record's fingerprint and session.
STACK_FIELDS = ("engine", "servelab_commit", "patches", "model", "args_hash", "weights_sha256")


@dataclass(frozen=True)
class Point:
    """One record's value of one figure, with the stack it was measured on."""

    started_at: float
    record: str  # the record folder's name
    value: float
    stack: Mapping[str, str | None]
    direction: str = "higher"
    unit: str = ""


@dataclass(frozen=True)
class Reset:
    at: float  # points that started at or after this begin a new series part
    reason: str
    profile: str | None = None
    host: str | None = None
    figure: str | None = None

    def applies(self, host: str, profile: str, figure: str) -> bool:
        return (
            (self.profile is None or self.profile == profile)
            and (self.host is None or self.host == host)
            and (self.figure is None or figure.startswith(self.figure))
        )


@dataclass(frozen=True)
class ChangePoint:
    index: int  # the first point of the new level
    point: Point
    before: float  # mean of the segment before
    after: float
    pvalue: float
    changed: tuple[str, ...]  # "engine: 'a' -> 'b'", ...

    @property
    def change(self) -> float:
        return self.after / self.before - 1.0 if self.before else math.inf

    @property
    def kind(self) -> str:
        worse = self.change < 0 if self.point.direction == "higher" else self.change > 0
        return "regression" if worse else "improvement"

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.point.started_at, UTC).strftime("%Y-%m-%d %H:%M")
        why = "; ".join(self.changed) or "no recorded stack change (the host, or load on it)"
        return (
            f"{self.kind} at {self.point.record} ({when} UTC, point {self.index}): "
            f"{self.before:.4g} -> {self.after:.4g} {self.point.unit} "
            f"({self.change * 100:+.1f}%, p = {self.pvalue:.2g}); changed: {why}"
        )


@dataclass
class Series:
    host: str
    profile: str
    figure: str
    points: list[Point] = field(default_factory=list)
    change_points: list[ChangePoint] = field(default_factory=list)
    resets: list[tuple[int, Reset]] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def record_folders(results_dir: Path) -> list[Path]:
    root = results_dir / "records"
    return sorted(p.parent for p in root.glob("*/record.json")) if root.is_dir() else []


def load_series(results_dir: Path, profile: str | None = None) -> list[Series]:
    """One series per (host key, profile, figure key) over every record under
    `results_dir/records`, ordered by session start; INVALID figures are not points."""
    return series_of(
        [(folder.name, load_record(folder)) for folder in record_folders(results_dir)], profile
    )


def series_of(
    records: Sequence[tuple[str, Mapping[str, Any]]], profile: str | None = None
) -> list[Series]:
    """`load_series` over records at hand, each with its name (a record folder's, or a
    report's session label): one series per (host key, profile, figure key)."""
    series: dict[tuple[str, str, str], Series] = {}
    for name, rec in records:
        session = rec.get("session") or {}
        started = float(session.get("started_at") or 0.0)
        for r in rec["results"]:
            if profile is not None and r.get("profile") != profile:
                continue
            fp = r.get("fingerprint") or {}
            host = str(fp.get("host_key") or rec["host"].get("key", "?"))
            stack = {k: _str(fp.get(k)) for k in STACK_FIELDS if k != "servelab_commit"}
            stack["servelab_commit"] = _str(session.get("servelab_commit"))
            for f in r.get("figures", []):
                value = f.get("value")
                if value is None or not math.isfinite(float(value)):
                    continue
                if invalid_note([str(n) for n in f.get("notes", [])]):
                    continue
                key = (host, str(r["profile"]), str(f["key"]))
                s = series.setdefault(key, Series(*key))
                s.points.append(
                    Point(
                        started,
                        name,
                        float(value),
                        stack,
                        str(f.get("direction", "higher")),
                        str(f.get("unit", "")),
                    )
                )
    for s in series.values():
        s.points.sort(key=lambda p: (p.started_at, p.record))
    return [series[k] for k in sorted(series)]


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def load_resets(path: Path) -> list[Reset]:
    """Annotated baseline resets from a TOML or JSON file (see the module's text)."""
    if path.suffix == ".json":
        data = read_json(path, error=ConfigError, what="resets file")
    else:
        data = read_toml(path, error=ConfigError, what="resets file")
    items = data.get("reset", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of [[reset]] tables")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: reset {i + 1}"
        if not isinstance(item, dict) or "at" not in item or not item.get("reason"):
            raise ConfigError(f"{where}: needs 'at' (a time or record name) and a 'reason'")
        out.append(
            Reset(
                _when(str(item["at"]), where),
                str(item["reason"]),
                _opt(item, "profile"),
                _opt(item, "host"),
                _opt(item, "figure"),
            )
        )
    return out


def _opt(item: Mapping[str, Any], key: str) -> str | None:
    return None if item.get(key) is None else str(item[key])


def _when(text: str, where: str) -> float:
    """An ISO 8601 time, or a record folder's name (it starts with its UTC time)."""
    try:  # record folders are named "20261201T120000Z-label"
        return datetime.strptime(text[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{where}: 'at' {text!r} is neither an ISO 8601 time nor a record folder's name"
        ) from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


# --------------------------------------------------------------------------- finding


def _otava() -> Any:
    try:
        from otava import analysis  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError(
            "servelab history needs Apache Otava: pip install --no-deps apache-otava==0.8.0"
        ) from None
    return analysis


def change_points(
    values: Sequence[float], *, max_pvalue: float = MAX_PVALUE, min_change: float = 0.0
) -> list[tuple[int, float, float, float]]:
    """(index, mean before, mean after, p-value) of each change point of `values` (Otava)."""
    if len(values) < 4:
        return []
    found, _ = _otava().compute_change_points(
        list(values), window_len=WINDOW, max_pvalue=max_pvalue, min_magnitude=min_change
    )
    return [
        (int(c.index), float(c.stats.mean_1), float(c.stats.mean_2), float(c.stats.pvalue))
        for c in found
    ]


def stack_changes(before: Point, after: Point) -> tuple[str, ...]:
    """What differs in the stack between two neighbouring points."""
    return tuple(
        f"{k}: {before.stack.get(k)!r} -> {after.stack.get(k)!r}"
        for k in STACK_FIELDS
        if before.stack.get(k) != after.stack.get(k)
    )


def analyse(
    series: Series,
    resets: Sequence[Reset] = (),
    *,
    max_pvalue: float = MAX_PVALUE,
    min_change: float = 0.0,
) -> Series:
    """Find `series`' change points, each part between resets on its own."""
    mine = sorted(
        (r for r in resets if r.applies(series.host, series.profile, series.figure)),
        key=lambda r: r.at,
    )
    cuts: list[int] = []
    for r in mine:
        i = next((i for i, p in enumerate(series.points) if p.started_at >= r.at), None)
        if i is not None and i > 0 and i not in cuts:
            cuts.append(i)
            series.resets.append((i, r))
    bounds = [0, *cuts, len(series.points)]
    series.change_points = []
    for lo, hi in pairwise(bounds):
        part = series.points[lo:hi]
        for i, before, after, p in change_points(
            [x.value for x in part], max_pvalue=max_pvalue, min_change=min_change
        ):
            at = lo + i
            changed = stack_changes(series.points[at - 1], series.points[at])
            series.change_points.append(
                ChangePoint(at, series.points[at], before, after, p, changed)
            )
    return series


def history(
    results_dir: Path,
    profile: str | None = None,
    resets: Sequence[Reset] = (),
    *,
    max_pvalue: float = MAX_PVALUE,
    min_change: float = 0.0,
) -> list[Series]:
    if not record_folders(results_dir):
        raise RecordError(f"no records under {results_dir / 'records'}: give a results folder")
    return [
        analyse(s, resets, max_pvalue=max_pvalue, min_change=min_change)
        for s in load_series(results_dir, profile)
    ]


def lines(
    all_series: Sequence[Series], *, verbose: bool = False, max_pvalue: float = MAX_PVALUE
) -> list[str]:
    out = []
    found = 0
    for s in all_series:
        if not (s.change_points or s.resets or verbose):
            continue
        out.append(f"{s.profile} on {s.host}: {s.figure} ({len(s.points)} points)")
        events: list[tuple[int, str]] = [(c.index, "  " + c.describe()) for c in s.change_points]
        events += [(i, f"  reset at {s.points[i].record}: {r.reason}") for i, r in s.resets]
        out += [text for _, text in sorted(events)]
        found += len(s.change_points)
    n_points = sum(len(s.points) for s in all_series)
    out.append(
        f"{found} change point(s) in {len(all_series)} series ({n_points} points); "
        f"Otava (Hunter: E-Divisive, then a t-test at p < {max_pvalue:g})"
    )
    return out


def to_json(all_series: Sequence[Series]) -> str:
    return json.dumps(
        [
            {
                "host": s.host,
                "profile": s.profile,
                "figure": s.figure,
                "points": [[p.record, p.value] for p in s.points],
                "change_points": [
                    {
                        "index": c.index,
                        "record": c.point.record,
                        "before": c.before,
                        "after": c.after,
                        "change": c.change,
                        "pvalue": c.pvalue,
                        "kind": c.kind,
                        "changed": list(c.changed),
                    }
                    for c in s.change_points
                ],
                "resets": [{"index": i, "reason": r.reason} for i, r in s.resets],
            }
            for s in all_series
        ],
        indent=2,
    )
