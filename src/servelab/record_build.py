"""Building a record: the session's data (targets, judged figures, lab extras) as one plain
JSON-able dict, in the shape `record.json` stores and `servelab report`/`compare` read.

Figures and verdicts have their dict forms here (`figure_dict`, `figure_from_dict`), so every
writer and reader of a figure agrees on one shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from servelab.baselines import Fingerprint, Verdict, figure_key
from servelab.errors import RecordError
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import HostIdentity, StackIdentity
from servelab.record_markdown import community_row

if TYPE_CHECKING:
    from servelab.session import SessionInfo
    from servelab.target import Target

SCHEMA_VERSION = 1
KIND = "servelab-record"
ARTIFACTS = ("record.json", "record.md", "raw.jsonl", "claims/")


@dataclass(frozen=True)
class TargetInfo:
    """One measured target (a profile, or an external endpoint), for records built outside a
    pytest session (the session itself passes `servelab.target.Target`)."""

    profile: str
    model: str
    engine: str
    fingerprint: Fingerprint
    quantization: str | None = None
    stack: StackIdentity | None = None
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- figures


def figure_dict(fig: Figure, verdict: Verdict | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "key": figure_key(fig),
        "metric": fig.metric,
        "title": fig.title,
        "unit": fig.unit,
        "direction": fig.direction,
        "value": fig.value,
        "runs": list(fig.runs),
        "shape": asdict(fig.shape),
        "concurrency": fig.shape.concurrency,
        "warm": fig.warm,
        "state": "warm" if fig.warm else "cold",
        "identity": asdict(fig.identity),
        "definition": fig.definition,
        "notes": list(fig.notes),
        "label": fig.label(),
    }
    if verdict is not None:
        d["verdict"] = verdict_dict(verdict)
    return d


def verdict_dict(v: Verdict) -> dict[str, Any]:
    out: dict[str, Any] = {"status": v.status, "text": v.text}
    if v.baseline is not None:
        s = v.baseline.summary
        out["baseline"] = {
            "runs": list(v.baseline.runs),
            "median": s.median,
            "min": s.min,
            "max": s.max,
            "threshold": v.baseline.threshold,
            "updated": v.baseline.updated,
        }
    if v.comparison is not None:
        out["comparison"] = asdict(v.comparison)
    return out


def figure_from_dict(d: Mapping[str, Any]) -> Figure:
    try:
        return Figure(
            metric=str(d["metric"]),
            title=str(d["title"]),
            unit=str(d["unit"]),
            direction=d["direction"],
            runs=tuple(float(x) for x in d["runs"]),
            shape=Shape(**d["shape"]),
            warm=bool(d["warm"]),
            identity=Identity(**d["identity"]),
            definition=str(d.get("definition", "")),
            notes=tuple(d.get("notes", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"figure {d.get('key', '?')!r}: malformed ({exc})") from None


def jsonable(obj: Any) -> Any:
    """Plain JSON data from dataclasses, mappings, sequences and scalars (others: str)."""
    from dataclasses import fields as dc_fields
    from dataclasses import is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dc_fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# --------------------------------------------------------------------------- record


def build_record(
    session: SessionInfo,
    host: HostIdentity,
    targets: Sequence[TargetInfo] | Sequence[Target],
    judged: Sequence[Figure | Verdict],
    artifacts: Sequence[str] = ARTIFACTS,
    lab: Mapping[str, Any] | None = None,
    *,
    requests: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The record of `judged` figures (a `Verdict` carries its figure; a bare `Figure` was not
    judged); `lab` holds the lab wiring's extras (quality gates, patch checks, /metrics
    deltas, session cache) as plain data; `requests` (the raw rows) tell the notes whether
    output lengths were forced."""
    pairs = [(j.figure, j) if isinstance(j, Verdict) else (j, None) for j in judged]
    plain_lab = jsonable(lab or {})
    metrics = plain_lab.get("metrics") or {}
    results = []
    for t in targets:
        mine = [(f, v) for f, v in pairs if f.identity.profile == t.profile]
        row = community_row(
            t,
            host,
            session,
            [f for f, _ in mine],
            artifacts,
            metrics=_metrics_of(metrics, t.profile, len(targets)),
            requests=requests,
        )
        results.append(
            {
                "profile": t.profile,
                "community": row,
                "fingerprint": asdict(t.fingerprint),
                "stack": t.stack.to_dict() if t.stack else None,
                "figures": [figure_dict(f, v) for f, v in mine],
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "session": asdict(session),
        "host": host.to_dict(),
        "results": results,
        "lab": plain_lab,
    }


def _metrics_of(metrics: Mapping[str, Any], profile: str, n_targets: int) -> dict[str, Any]:
    """The /metrics deltas (by pytest node id) of one target: all of them when the session
    measured one target, else those whose node id names the profile."""
    if n_targets <= 1:
        return dict(metrics)
    return {node: d for node, d in metrics.items() if profile in node}
