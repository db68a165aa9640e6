"""The per-build conformance report: one row per (preset, check), saved as JSON.

A row holds the figure a check measured, the threshold it was held to and its verdict:
``pass`` / ``fail`` for checks with a threshold, ``figure`` for adversarial inputs reported as
numbers (known limitations, no verdict), ``skip`` with the reason where the check could not run.
``compare_reports`` sets two builds' reports side by side, so a kernel that regressed in a new
engine build reads as a verdict ("regressed": passed before, fails now).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from servelab.errors import RecordError
from servelab.files import atomic_write_json

SCHEMA_VERSION = 1
Verdict = Literal["pass", "fail", "figure", "skip"]


@dataclass(frozen=True)
class Row:
    preset: str
    check: str
    verdict: Verdict
    figure: float | None = None
    threshold: str = ""
    unit: str = ""
    detail: str = ""  # what was measured, and for a mismatch the input that shows it

    def line(self) -> str:
        fig = "" if self.figure is None else f" {self.figure:.6g}{self.unit and ' ' + self.unit}"
        limit = f" (limit {self.threshold})" if self.threshold else ""
        return (
            f"{self.verdict.upper():6} {self.preset:20} {self.check:28}{fig}{limit} {self.detail}"
        )


@dataclass
class Report:
    engine: str
    device: str
    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        rows = [
            {
                **asdict(r),
                "figure": None if r.figure is None or not math.isfinite(r.figure) else r.figure,
            }
            for r in self.rows
        ]
        return {
            "schema_version": SCHEMA_VERSION,
            "engine": self.engine,
            "device": self.device,
            "meta": self.meta,
            "rows": rows,
        }

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json(), sort_keys=True)
        return path


def load_report(path: Path) -> Report:
    data = json.loads(path.read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(
            f"load_report: {path} has schema_version {data.get('schema_version')!r}; this "
            f"servelab reads {SCHEMA_VERSION}"
        )
    rows = [Row(**r) for r in data["rows"]]
    return Report(data["engine"], data["device"], rows, data.get("meta", {}))


def compare_reports(old: Report, new: Report) -> list[tuple[str, str, str, str]]:
    """(preset, check, old verdict → new verdict, outcome) for every row of ``new``.

    Outcome: ``regressed`` (pass → fail), ``fixed`` (fail → pass), ``new`` (no old row),
    ``same`` otherwise.
    """
    before = {(r.preset, r.check): r for r in old.rows}
    out: list[tuple[str, str, str, str]] = []
    for r in new.rows:
        o = before.get((r.preset, r.check))
        if o is None:
            outcome = "new"
        elif o.verdict == "pass" and r.verdict == "fail":
            outcome = "regressed"
        elif o.verdict == "fail" and r.verdict == "pass":
            outcome = "fixed"
        else:
            outcome = "same"
        out.append((r.preset, r.check, f"{o.verdict if o else '-'} -> {r.verdict}", outcome))
    return out
