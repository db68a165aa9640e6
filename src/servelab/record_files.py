"""A record on disk: write the record folder (every string redacted first), read it back.

A record folder holds `record.json` (everything, machine-readable), `record.md` (the community
result table plus every figure with its labels and verdict), `claims/<id>.json` (one
claims-registry-compatible file per decode or output throughput figure), `raw.jsonl` (one row
per request) and redacted copies of the server logs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servelab.claims import claim_id, claims
from servelab.errors import RecordError
from servelab.figures import Figure
from servelab.files import atomic_write_json, atomic_write_text, read_json
from servelab.record_build import KIND, SCHEMA_VERSION, figure_from_dict
from servelab.record_markdown import render_markdown
from servelab.redact import Redactor


@dataclass(frozen=True)
class RecordPaths:
    folder: Path
    json: Path
    markdown: Path
    claims: tuple[Path, ...]
    raw: Path
    logs: tuple[Path, ...] = field(default_factory=tuple)


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
    atomic_write_json(json_path, safe)
    md = folder / "record.md"
    atomic_write_text(md, redactor.text(render_markdown(safe)))
    claim_paths = []
    for c in claims(safe):
        p = folder / "claims" / f"{c['id']}.json"
        atomic_write_json(p, c)
        claim_paths.append(p)
    raw = folder / "raw.jsonl"
    atomic_write_text(raw, "".join(json.dumps(redactor.data(dict(r))) + "\n" for r in requests))
    copies = []
    for log in logs:
        if log.is_file():
            dst = folder / "logs" / log.name
            text = log.read_text(encoding="utf-8", errors="replace")
            atomic_write_text(dst, redactor.text(text))
            copies.append(dst)
    return RecordPaths(folder, json_path, md, tuple(claim_paths), raw, tuple(copies))


def load_record(path: Path) -> dict[str, Any]:
    """A saved record (the folder or its record.json), validated at the top level."""
    if path.is_dir():
        path = path / "record.json"
    raw = read_json(path, error=RecordError, what="record")
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
