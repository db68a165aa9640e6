"""Labeled result records: what one perf session measured, in the lab's community format.

A record folder holds `record.json` (everything, machine-readable), `record.md` (the community
result table plus every figure with its labels and verdict), `claims/<id>.json` (one
claims-registry-compatible file per throughput figure), `raw.jsonl` (one row per request) and
redacted copies of the server logs. Every string passes through a `Redactor` before it is
written. Records are plain data: `servelab report` / `compare` read them back without pytest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servelab.baselines import (
    Fingerprint,
    Verdict,
    atomic_write_text,
    figure_key,
)
from servelab.claims import claim_id, claims
from servelab.errors import RecordError
from servelab.figures import Figure
from servelab.hardware import (
    HostIdentity,
    StackIdentity,
)
from servelab.redact import Redactor
from servelab.session import SessionInfo, request_row  # noqa: F401  (request_row: re-export)

if TYPE_CHECKING:
    from servelab.target import Target

SCHEMA_VERSION = 1
KIND = "servelab-record"
COMMUNITY_FIELDS = (
    "Model",
    "Quantization",
    "Hardware",
    "OS/kernel",
    "Engine/backend",
    "Recipe or commit",
    "Prompt/output/context",
    "Batch/concurrency",
    "Quality check",
    "Output tok/s",
    "Total tok/s",
    "Notes",
    "Artifacts",
)


@dataclass(frozen=True)
class TargetInfo:
    """One measured target (a profile, or an external endpoint)."""

    profile: str
    model: str
    engine: str
    fingerprint: Fingerprint
    quantization: str | None = None
    stack: StackIdentity | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordPaths:
    folder: Path
    json: Path
    markdown: Path
    claims: tuple[Path, ...]
    raw: Path
    logs: tuple[Path, ...] = field(default_factory=tuple)


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
    from servelab.figures import Identity, Shape

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


def is_rate(fig: Figure) -> bool:
    return "tok/s" in fig.unit and "prefill" not in fig.metric


def is_total_rate(fig: Figure) -> bool:
    return is_rate(fig) and "total" in fig.metric


def _short(fig: Figure) -> str:
    v = fig.value
    shown = "n/a" if v is None else f"{v:.4g}"
    state = "warm" if fig.warm else "cold"
    return f"{shown} {fig.unit} [{fig.metric}; {fig.shape.describe()}; {state}; n={len(fig.runs)}]"


# --------------------------------------------------------------------------- record


def community_row(
    target: TargetInfo | Target,
    host: HostIdentity,
    session: SessionInfo,
    figures: Sequence[Figure],
    artifacts: Sequence[str],
) -> dict[str, str]:
    shapes = sorted({f.shape.describe().rsplit(", c", 1)[0] for f in figures})
    concs = sorted({f.shape.concurrency for f in figures})
    out_rates = [_short(f) for f in figures if is_rate(f) and not is_total_rate(f)]
    tot_rates = [_short(f) for f in figures if is_total_rate(f)]
    if session.invalid_reasons:
        quality = "FAILED (no speed verdict): " + "; ".join(session.invalid_reasons)
    elif session.quality_checks:
        quality = "; ".join(session.quality_checks)
    else:
        quality = "not checked"
    stack = target.stack
    engine = target.engine
    if stack is not None and stack.engine_commit:
        engine += f" (commit {stack.engine_commit})"
    if stack is not None and stack.patches:
        engine += "; patches " + ", ".join(f"{f} sha256:{h[:12]}" for f, h in stack.patches)
    recipe = f"servelab {session.servelab_commit}: {session.command}"
    if stack is not None and stack.command:
        recipe += " | server: " + " ".join(stack.command)
    notes = [
        *target.notes,
        "warm" if all(f.warm for f in figures) else "warm/cold as labeled",
        "no speculative decoding unless the engine arguments say so",
    ]
    if session.interrupted:
        notes.insert(0, "session interrupted: partial record of the tests that finished")
    return {
        "Model": target.model,
        "Quantization": target.quantization or "unknown",
        "Hardware": host.describe_hardware(),
        "OS/kernel": f"{host.os}; kernel {host.kernel}; accelerator driver {host.drivers()}",
        "Engine/backend": engine,
        "Recipe or commit": recipe,
        "Prompt/output/context": "; ".join(shapes) or "n/a",
        "Batch/concurrency": ", ".join(f"c{c}" for c in concs) or "n/a",
        "Quality check": quality,
        "Output tok/s": "; ".join(out_rates) or "not measured",
        "Total tok/s": "; ".join(tot_rates) or "not measured",
        "Notes": "; ".join(notes),
        "Artifacts": ", ".join(artifacts),
    }


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


def build_record(
    session: SessionInfo,
    host: HostIdentity,
    targets: Sequence[TargetInfo] | Sequence[Target],
    judged: Sequence[Figure | Verdict],
    artifacts: Sequence[str] = ("record.json", "record.md", "raw.jsonl", "claims/"),
    lab: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of `judged` figures (a `Verdict` carries its figure; a bare `Figure` was not
    judged); `lab` holds the lab wiring's extras (quality gates, patch checks, /metrics
    deltas, session cache) as plain data."""
    pairs = [(j.figure, j) if isinstance(j, Verdict) else (j, None) for j in judged]
    results = []
    for t in targets:
        mine = [(f, v) for f, v in pairs if f.identity.profile == t.profile]
        results.append(
            {
                "profile": t.profile,
                "community": community_row(t, host, session, [f for f, _ in mine], artifacts),
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
        "lab": jsonable(lab or {}),
    }


# --------------------------------------------------------------------------- markdown


def _cell(s: object) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(record: Mapping[str, Any]) -> str:
    s = record["session"]
    lines = [
        "# servelab result record",
        "",
        f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(s['finished_at']))}",
        f"- command: `{s['command']}`",
        f"- servelab commit: {s['servelab_commit']}; run by {s['by']}; host key "
        f"`{record['host']['key']}`",
        f"- exit status: {s['exit_status']}" + (" (interrupted)" if s["interrupted"] else ""),
    ]
    if s["invalid_reasons"]:
        lines.append("- **invalid run**: " + "; ".join(s["invalid_reasons"]))
    if s["failed_tests"]:
        lines.append("- failed tests: " + ", ".join(s["failed_tests"]))
    for res in record["results"]:
        lines += ["", f"## {res['profile']}", "", "| Field | Value |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in res["community"].items()]
        lines += [
            "",
            "| Metric | Value | Unit | Shape | Conc. | Warm/cold | Runs | Verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in res["figures"]:
            v = f["value"]
            shape = f["shape"]
            desc = ", ".join(
                f"{k.split('_')[0]} {shape[k]}"
                for k in ("prompt_tokens", "output_tokens", "context_tokens")
                if shape.get(k) is not None
            )
            verdict = f.get("verdict", {}).get("text", "not compared")
            lines.append(
                f"| {_cell(f['title'])} (`{f['metric']}`) | "
                f"{'n/a' if v is None else f'{v:.4g}'} | {f['unit']} | {desc} | "
                f"{f['concurrency']} | {f['state']} | {len(f['runs'])} | {_cell(verdict)} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def write_record(
    folder: Path,
    record: Mapping[str, Any],
    redactor: Redactor,
    *,
    requests: Sequence[Mapping[str, Any]] = (),
    logs: Sequence[Path] = (),
) -> RecordPaths:
    """Write one record folder; every string is redacted first."""
    folder.mkdir(parents=True, exist_ok=True)
    safe = redactor.data(record)
    json_path = folder / "record.json"
    atomic_write_text(json_path, json.dumps(safe, indent=2, sort_keys=False) + "\n")
    md = folder / "record.md"
    atomic_write_text(md, redactor.text(render_markdown(safe)))
    claim_paths = []
    for c in claims(safe):
        p = folder / "claims" / f"{c['id']}.json"
        atomic_write_text(p, json.dumps(c, indent=2) + "\n")
        claim_paths.append(p)
    raw = folder / "raw.jsonl"
    atomic_write_text(raw, "".join(json.dumps(redactor.data(dict(r))) + "\n" for r in requests))
    copies = []
    for log in logs:
        if log.is_file():
            dst = folder / "logs" / log.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = log.read_text(encoding="utf-8", errors="replace")
            atomic_write_text(dst, redactor.text(text))
            copies.append(dst)
    return RecordPaths(folder, json_path, md, tuple(claim_paths), raw, tuple(copies))


def load_record(path: Path) -> dict[str, Any]:
    """A saved record (the folder or its record.json), validated at the top level."""
    if path.is_dir():
        path = path / "record.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: no such record") from None
    except ValueError as exc:
        raise RecordError(f"{path}: corrupt or truncated record JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise RecordError(f"{path}: field 'kind' must be {KIND!r}: not a servelab record")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(
            f"{path}: field 'schema_version' is {raw.get('schema_version')!r}; "
            f"this servelab reads {SCHEMA_VERSION}"
        )
    for k in ("session", "host", "results"):
        if k not in raw:
            raise RecordError(f"{path}: missing field {k!r}")
    return raw


def record_figures(record: Mapping[str, Any]) -> list[tuple[Figure, dict[str, Any]]]:
    return [(figure_from_dict(f), f) for res in record["results"] for f in res["figures"]]


def session_folder(results_dir: Path, started_at: float, label: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
    base = results_dir / "records" / f"{stamp}-{claim_id(label) or 'session'}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder
