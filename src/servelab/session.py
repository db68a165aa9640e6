"""One home for a perf session's results: targets, judged figures, gates, patch reports,
/metrics deltas, session-cache results and request rows.

Each figure is judged once, where it is measured, and travels as its `Verdict` (which holds
the figure): the record, the report, the terminal summary and the pytest-xdist controller all
read that verdict; nothing is judged again. Under xdist each worker saves its
`SessionResults` after every test and the controller merges them (`merge`); that is all
xdist carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from servelab.baselines import MetricBaseline, Verdict
from servelab.errors import QualityGateError, RecordError
from servelab.figures import Figure, Shape
from servelab.gate_report import GateReport
from servelab.patches import PatchReport
from servelab.stats import Comparison
from servelab.target import Target

SCHEMA_VERSION = 1
KIND = "servelab-session-results"


@dataclass(frozen=True)
class SessionInfo:
    """How the session ran: when, by what command and whom, how it ended."""

    started_at: float
    finished_at: float
    command: str
    exit_status: int
    interrupted: bool
    servelab_commit: str
    by: str
    invalid_reasons: tuple[str, ...] = ()
    quality_checks: tuple[str, ...] = ()
    failed_tests: tuple[str, ...] = ()


def request_row(record: Any, **labels: Any) -> dict[str, Any]:
    """One raw per-request row (a client RequestRecord or any dataclass) with its labels."""
    from dataclasses import is_dataclass

    body = asdict(record) if is_dataclass(record) and not isinstance(record, type) else dict(record)
    return {**labels, **body}


@dataclass
class SessionResults:
    """Everything one pytest process measured (or, after `merge`, the whole session)."""

    targets: dict[str, Target] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)  # each holds its figure
    gates: dict[str, GateReport] = field(default_factory=dict)
    patches: dict[str, PatchReport] = field(default_factory=dict)
    # JSON data by pytest node id: a /metrics delta, or the reason it is missing (a str).
    metrics: dict[str, Any] = field(default_factory=dict)
    session_cache: dict[str, Any] = field(default_factory=dict)  # JSON data by target
    invalid_reasons: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # raw per-request rows
    # Health receipts by target: {"admission": ..., "post_run": ..., "difference": ...,
    # "problems": [...]} (servelab.receipts), and how each engine stopped (StopRecord dicts).
    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)
    stops: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Accelerator telemetry by pytest node id: each kept run's figures, status and a short
    # power/memory series, or why it was not measured (servelab.telemetry).
    telemetry: dict[str, Any] = field(default_factory=dict)
    # Interleaved A/B verdicts by pytest node id: both sides' runs, the block orders and the
    # sequential verdict (servelab.ab, perf/test_ab.py).
    ab: dict[str, Any] = field(default_factory=dict)

    @property
    def figures(self) -> list[Figure]:
        return [v.figure for v in self.verdicts]

    @property
    def quality_checks(self) -> list[str]:
        return [line for g in self.gates.values() for line in g.lines()]

    def invalidate(self, reasons: Iterable[str]) -> None:
        for r in reasons:
            if r not in self.invalid_reasons:
                self.invalid_reasons.append(r)

    def has_data(self) -> bool:
        return bool(
            self.verdicts
            or self.requests
            or self.invalid_reasons
            or self.gates
            or self.patches
            or self.metrics
            or self.session_cache
            or self.receipts
            or self.stops
            or self.ab
        )

    def lab(self) -> dict[str, Any]:
        """The record's `lab` section (quality gates, patch checks, /metrics, session cache,
        health receipts, engine stops)."""
        return {
            "gates": {t: g.to_dict() for t, g in self.gates.items()},
            "patches": {t: asdict(p) for t, p in self.patches.items()},
            "metrics": dict(self.metrics),
            "session_cache": dict(self.session_cache),
            "receipts": {t: dict(r) for t, r in self.receipts.items()},
            "stops": dict(self.stops),
            "telemetry": dict(self.telemetry),
            "ab": dict(self.ab),
        }

    # ------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        from servelab.records import jsonable

        return {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "targets": {n: t.to_dict() for n, t in self.targets.items()},
            "verdicts": [verdict_to_dict(v) for v in self.verdicts],
            **self.lab(),
            "invalid_reasons": list(self.invalid_reasons),
            "requests": jsonable(self.requests),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionResults:
        if d.get("kind") != KIND or d.get("schema_version") != SCHEMA_VERSION:
            raise RecordError(
                f"not servelab session results of schema {SCHEMA_VERSION} "
                f"(kind {d.get('kind')!r}, schema_version {d.get('schema_version')!r})"
            )
        try:
            return cls(
                targets={str(n): Target.from_dict(t) for n, t in d["targets"].items()},
                verdicts=[verdict_from_dict(v) for v in d["verdicts"]],
                gates={str(t): GateReport.from_dict(g) for t, g in d["gates"].items()},
                patches={str(t): patch_report_from_dict(p) for t, p in d["patches"].items()},
                metrics=dict(d["metrics"]),
                session_cache=dict(d["session_cache"]),
                invalid_reasons=[str(r) for r in d["invalid_reasons"]],
                requests=[dict(r) for r in d["requests"]],
                receipts={str(t): dict(r) for t, r in d.get("receipts", {}).items()},
                stops={str(t): dict(r) for t, r in d.get("stops", {}).items()},
                telemetry=dict(d.get("telemetry", {})),
                ab=dict(d.get("ab", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"saved session results are malformed ({exc!r})") from None

    @classmethod
    def merge(cls, parts: Iterable[SessionResults]) -> SessionResults:
        """One session from its processes' parts: figures and request rows all kept, in
        part order; a target, gate or patch report that several workers share (one started
        the server, one ran the gate, the others reused them) appears once, the first seen
        with a startup time winning; a reason several workers reported appears once; a target's
        receipts keep the first of each kind; stop records are kept by target."""
        out = cls()
        for part in parts:
            for name, target in part.targets.items():
                mine = out.targets.get(name)
                if mine is None or (mine.startup_seconds is None and target.startup_seconds):
                    out.targets[name] = target
            out.verdicts += part.verdicts
            for target_name, gate in part.gates.items():
                out.gates.setdefault(target_name, gate)
            for target_name, report in part.patches.items():
                out.patches.setdefault(target_name, report)
            out.metrics.update(part.metrics)
            out.session_cache.update(part.session_cache)
            out.invalidate(part.invalid_reasons)
            out.requests += part.requests
            for target_name, receipts in part.receipts.items():
                kept = out.receipts.setdefault(target_name, {})
                for key, value in receipts.items():
                    kept.setdefault(key, value)  # the first admission, the first post-run
            out.stops.update(part.stops)
            out.telemetry.update(part.telemetry)
            out.ab.update(part.ab)
        return out


def verdict_to_dict(v: Verdict) -> dict[str, Any]:
    from servelab.records import figure_dict

    return {
        "figure": figure_dict(v.figure),
        "status": v.status,
        "text": v.text,
        "baseline": None if v.baseline is None else asdict(v.baseline),
        "comparison": None if v.comparison is None else asdict(v.comparison),
    }


def verdict_from_dict(d: Mapping[str, Any]) -> Verdict:
    from servelab.records import figure_from_dict

    mb = d["baseline"]
    baseline = None
    if mb is not None:
        baseline = MetricBaseline(
            **{**mb, "shape": Shape(**mb["shape"]), "runs": tuple(float(x) for x in mb["runs"])}
        )
    cmp = d["comparison"]
    return Verdict(
        figure_from_dict(d["figure"]),
        d["status"],
        str(d["text"]),
        baseline,
        None if cmp is None else Comparison(**cmp),
    )


def patch_report_from_dict(d: Mapping[str, Any]) -> PatchReport:
    from servelab.patches import FileStatus, PatchStatus

    try:
        return PatchReport(
            str(d["root"]),
            tuple(
                PatchStatus(
                    p["name"], p["path"], p["sha256"], tuple(FileStatus(**f) for f in p["files"])
                )
                for p in d["patches"]
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QualityGateError(f"saved patch report is malformed ({exc!r})") from None
