"""A record on disk: write the record folder (every string redacted first), read it back.

A record folder holds `record.json` (everything, machine-readable), `record.md` (the community
result table plus every figure with its labels and verdict), `claims/<id>.json` (one
claims-registry-compatible file per decode or output throughput figure), `raw.jsonl` (one row
per request) and redacted copies of the server logs.

`record.json` carries an `integrity` block: sha256 content hashes of the raw rows (the bytes of
`raw.jsonl`), of each figure (with its verdict), of each profile's fingerprint and engine
identity, a fingerprint of servelab's own source, and one hash over the rest of the record;
`servelab verify` (`servelab.verify`) checks them and recomputes what the rows determine.
"""

from __future__ import annotations

import hashlib
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
    record_sha256: str | None = None  # integrity["record"]: what a baseline names as its source


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
    rows_text = "".join(json.dumps(redactor.data(dict(r))) + "\n" for r in requests)
    # The hashes are of what is written: the redacted record as JSON reads it back.
    safe = json.loads(json.dumps(redactor.data(record)))
    safe.pop(INTEGRITY, None)
    safe[INTEGRITY] = integrity(safe, rows_text)
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
    atomic_write_text(raw, rows_text)
    copies = []
    for log in logs:
        if log.is_file():
            dst = folder / "logs" / log.name
            text = log.read_text(encoding="utf-8", errors="replace")
            atomic_write_text(dst, redactor.text(text))
            copies.append(dst)
    return RecordPaths(
        folder, json_path, md, tuple(claim_paths), raw, tuple(copies), safe[INTEGRITY]["record"]
    )


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


# --------------------------------------------------------------------------- integrity

#: The key of record.json's content hashes.
INTEGRITY = "integrity"
HASH = "sha256"


def content_hash(data: Any) -> str:
    """sha256 of `data` as canonical JSON (sorted keys, no spaces; NaN spelled as JSON reads it)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_fingerprint() -> str:
    """sha256 over servelab's own Python source (each file's path inside the package and its
    bytes, in path order): which code wrote a record."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def figure_hash_key(profile: str, figure: Mapping[str, Any]) -> str:
    return f"{profile}/{figure.get('key', '?')}"


def engine_identity(result: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the engine of one result: its fingerprint's engine, model and host
    key, and the stack (engine version, arguments, patches) as recorded."""
    fp = result.get("fingerprint") or {}
    return {
        "engine": fp.get("engine"),
        "model": fp.get("model"),
        "host_key": fp.get("host_key"),
        "stack": result.get("stack"),
    }


def integrity(record: Mapping[str, Any], rows_text: str) -> dict[str, Any]:
    """The content hashes of a record (without its own `integrity` block) and its rows."""
    body = {k: v for k, v in record.items() if k != INTEGRITY}
    results = body.get("results", [])
    return {
        "algorithm": HASH,
        "rows": text_hash(rows_text),
        "rows_count": rows_text.count("\n"),
        "figures": {
            figure_hash_key(r["profile"], f): content_hash(f)
            for r in results
            for f in r.get("figures", [])
        },
        "profiles": {
            r["profile"]: content_hash(
                {"profile": r["profile"], "fingerprint": r.get("fingerprint")}
            )
            for r in results
        },
        "engines": {r["profile"]: content_hash(engine_identity(r)) for r in results},
        "source": source_fingerprint(),
        "record": content_hash(body),
    }
