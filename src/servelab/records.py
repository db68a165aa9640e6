"""Labeled result records: what one perf session measured, in the lab's community format.

A record folder holds `record.json` (everything, machine-readable), `record.md` (the community
result table plus every figure with its labels and verdict), `claims/<id>.json` (one
claims-registry-compatible file per throughput figure), `raw.jsonl` (one row per request) and
redacted copies of the server logs. Every string passes through a `Redactor` before it is
written. Records are plain data: `servelab report` / `compare` read them back without pytest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servelab.baselines import (
    Baseline,
    BaselineStore,
    Fingerprint,
    Provenance,
    Verdict,
    atomic_write_text,
    figure_key,
    judge,
    utc_now,
)
from servelab.claims import claim_id, claims
from servelab.errors import BaselineError, RecordError
from servelab.figures import Figure
from servelab.hardware import (
    HostIdentity,
    StackIdentity,
    collect_host,
    collect_stack,
    patches_digest,
)
from servelab.redact import Redactor

if TYPE_CHECKING:
    from servelab.profiles import Profile

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
class SessionInfo:
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
    target: TargetInfo,
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
    targets: Sequence[TargetInfo],
    figures: Sequence[Figure],
    verdicts: Sequence[Verdict] = (),
    artifacts: Sequence[str] = ("record.json", "record.md", "raw.jsonl", "claims/"),
    lab: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record; `lab` holds the lab wiring's extras (quality gates, patch checks,
    /metrics deltas, session cache) as plain data."""
    by_fig = {id(v.figure): v for v in verdicts}
    results = []
    for t in targets:
        mine = [f for f in figures if f.identity.profile == t.profile]
        results.append(
            {
                "profile": t.profile,
                "community": community_row(t, host, session, mine, artifacts),
                "fingerprint": asdict(t.fingerprint),
                "stack": t.stack.to_dict() if t.stack else None,
                "figures": [figure_dict(f, by_fig.get(id(f))) for f in mine],
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


# --------------------------------------------------------------------------- session


def request_row(record: Any, **labels: Any) -> dict[str, Any]:
    """One raw per-request row (a client RequestRecord or any dataclass) with its labels."""
    from dataclasses import is_dataclass

    body = asdict(record) if is_dataclass(record) and not isinstance(record, type) else dict(record)
    return {**labels, **body}


class PerfSession:
    """The verdict and record side of one pytest session (works without pytest).

    Judges each figure as it is recorded (caching host identity, stacks and baselines), and
    at the end writes the record folder and, in update mode, the baselines.
    """

    def __init__(
        self,
        *,
        baselines_dir: Path,
        results_dir: Path,
        profiles: Sequence[Profile] = (),
        update: bool = False,
        secrets: Sequence[str | None] = (),
        headers: Sequence[Mapping[str, str]] = (),
        host: HostIdentity | None = None,
        weights: bool = True,
    ) -> None:
        self.store = BaselineStore(baselines_dir)
        self.results_dir = results_dir
        self.profiles = {p.name: p for p in profiles}
        self.update = update
        self.weights = weights
        self._host = host
        self._stacks: dict[str, StackIdentity] = {}
        self._baselines: dict[tuple[str, str], Baseline | BaselineError | None] = {}
        self.verdicts: list[Verdict] = []
        self.redactor = Redactor.from_sources(
            environ=os.environ,
            envs=[p.engine.env for p in profiles],
            headers=headers,
            values=secrets,
        )

    @property
    def host(self) -> HostIdentity:
        if self._host is None:
            self._host = collect_host()
        return self._host

    def stack(self, fig: Figure) -> StackIdentity:
        name = fig.identity.profile
        if name not in self._stacks:
            self._stacks[name] = collect_stack(
                self.profiles.get(name), fig.identity.engine, weights=self.weights
            )
        return self._stacks[name]

    def fingerprint(self, fig: Figure) -> Fingerprint:
        stack = self.stack(fig)
        host = self.host
        return Fingerprint(
            host_key=fig.identity.host,
            engine=fig.identity.engine,
            model=fig.identity.model,
            args_hash=stack.args_hash,
            weights_sha256=stack.weights_sha256,
            driver=host.drivers() if host.accelerators else None,
            patches=patches_digest(stack),
        )

    def judge(self, fig: Figure) -> Verdict:
        fp = self.fingerprint(fig)
        key = (fp.host_key, fig.identity.profile)
        path = self.store.path(*key)
        if key not in self._baselines:
            try:
                self._baselines[key] = self.store.load(*key)
            except BaselineError as exc:
                self._baselines[key] = exc
        base = self._baselines[key]
        if isinstance(base, BaselineError):
            verdict = Verdict(fig, "refused", f"unusable baseline: {base}")
        else:
            verdict = judge(fig, base, fp, path)
        self.verdicts.append(verdict)
        return verdict

    def targets(self, figures: Sequence[Figure]) -> list[TargetInfo]:
        out = []
        for name in dict.fromkeys(f.identity.profile for f in figures):
            fig = next(f for f in figures if f.identity.profile == name)
            stack = self.stack(fig)
            notes = () if name in self.profiles else ("external endpoint: server flags unknown",)
            out.append(
                TargetInfo(
                    name,
                    fig.identity.model,
                    fig.identity.engine,
                    self.fingerprint(fig),
                    stack.quantization,
                    stack,
                    notes,
                )
            )
        return out

    def finish(
        self,
        *,
        figures: Sequence[Figure],
        session: SessionInfo,
        requests: Sequence[Mapping[str, Any]] = (),
        logs: Sequence[Path] = (),
        label: str = "session",
        lab: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Write the record (always, when anything was measured) and update baselines when
        asked and allowed. Returns the lines to show the user."""
        lines: list[str] = []
        if figures or requests:
            record = build_record(
                session, self.host, self.targets(figures), figures, self.verdicts, lab=lab
            )
            folder = session_folder(self.results_dir, session.started_at, label)
            paths = write_record(folder, record, self.redactor, requests=requests, logs=logs)
            lines.append(
                f"record written: {paths.folder} (record.json, record.md, "
                f"{len(paths.claims)} claim(s), {len(requests)} raw request row(s))"
            )
        if self.update:
            lines += self._update(figures, session)
        return lines

    def _update(self, figures: Sequence[Figure], session: SessionInfo) -> list[str]:
        why = []
        if session.invalid_reasons:
            why.append("quality gate / validity failed: " + "; ".join(session.invalid_reasons))
        if session.failed_tests:
            why.append("failed or errored tests: " + ", ".join(session.failed_tests))
        if session.interrupted:
            why.append("the session was interrupted")
        if not figures:
            why.append("nothing was measured")
        if why:
            return ["baseline update REFUSED, nothing written: " + " | ".join(why)]
        lines = []
        for t in self.targets(figures):
            mine = [f for f in figures if f.identity.profile == t.profile]
            prov = Provenance(
                utc_now(),
                session.servelab_commit,
                t.engine,
                t.model,
                session.by,
                self.redactor.text(session.command),
            )
            try:
                res = self.store.update(t.profile, t.fingerprint, prov, mine)
            except BaselineError as exc:
                lines.append(f"baseline update REFUSED for {t.profile}: {exc}")
                continue
            lines.append(
                f"baseline updated: {res.path}"
                + (f" (previous kept in {res.history})" if res.history else "")
            )
            lines += [f"  {d}" for d in res.diff]
        return lines
