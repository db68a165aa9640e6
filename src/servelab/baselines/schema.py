"""The baseline file format: one JSON file per `baselines/<host key>/<profile>.json`.

It holds the stack fingerprint the numbers belong to, provenance, and per metric its
direction, unit, shape, per-run values, summary (derived, written for readers, not read back)
and threshold. Loading validates it through `servelab.schema` (unknown schema version,
missing or extra fields, wrong types: a BaselineError naming the file and the field, and
saying how to repair the file).
"""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from servelab import schema
from servelab.errors import BaselineError
from servelab.figures import Direction, Figure, Shape
from servelab.files import parse_json, read_text

SCHEMA_VERSION = 1
CREATE_HINT = "create one with `pytest -m perf --update-baselines`"


def figure_key(fig: Figure) -> str:
    """Identity of a figure inside one profile: metric, shape and warm/cold."""
    return shape_key(fig.metric, fig.shape, fig.warm)


def shape_key(metric: str, shape: Shape, warm: bool) -> str:
    parts = [metric]
    if shape.prompt_tokens is not None:
        parts.append(f"p{shape.prompt_tokens}")
    if shape.output_tokens is not None:
        parts.append(f"o{shape.output_tokens}")
    if shape.context_tokens is not None:
        parts.append(f"ctx{shape.context_tokens}")
    parts += [f"c{shape.concurrency}", "warm" if warm else "cold"]
    return "/".join(parts)


@dataclass(frozen=True)
class Fingerprint:
    """What must match for two measurements to be comparable. `None` means unknown."""

    host_key: str
    engine: str
    model: str
    args_hash: str | None = None
    weights_sha256: str | None = None
    driver: str | None = None
    patches: str | None = None  # digest over the profile's patch file hashes

    def differences(self, other: Fingerprint) -> list[str]:
        """'field: baseline X vs this run Y' for every known field that differs."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is not None and theirs is not None and mine != theirs:
                out.append(f"{f.name}: baseline {mine!r} vs this run {theirs!r}")
        return out


@dataclass(frozen=True)
class Provenance:
    date: str  # ISO 8601 UTC
    servelab_commit: str
    engine: str
    model: str
    by: str
    command: str = ""
    record_sha256: str | None = None  # the record this baseline was taken from (verify)


@dataclass(frozen=True)
class Summary:
    count: int
    median: float
    mean: float
    geomean: float | None
    stdev: float | None
    cv: float | None
    min: float
    max: float

    @classmethod
    def of(cls, runs: Sequence[float]) -> Summary:
        v = [x for x in runs if math.isfinite(x)]
        if not v:
            raise BaselineError("cannot summarise a metric without finite runs")
        mean = statistics.fmean(v)
        sd = statistics.stdev(v) if len(v) > 1 else None
        geo = statistics.geometric_mean(v) if min(v) > 0 else None
        return cls(
            len(v),
            statistics.median(v),
            mean,
            geo,
            sd,
            sd / mean if sd is not None and mean else None,
            min(v),
            max(v),
        )


@dataclass(frozen=True)
class MetricBaseline:
    metric: str
    title: str
    unit: str
    direction: Direction
    shape: Shape
    warm: bool
    runs: tuple[float, ...]
    threshold: float
    updated: str
    definition: str = ""

    @property
    def key(self) -> str:
        return shape_key(self.metric, self.shape, self.warm)

    @property
    def summary(self) -> Summary:
        return Summary.of(self.runs)

    @classmethod
    def from_figure(cls, fig: Figure, threshold: float, updated: str) -> MetricBaseline:
        return cls(
            fig.metric,
            fig.title,
            fig.unit,
            fig.direction,
            fig.shape,
            fig.warm,
            tuple(fig.runs),
            threshold,
            updated,
            fig.definition,
        )


@dataclass(frozen=True)
class Baseline:
    profile: str
    fingerprint: Fingerprint
    provenance: Provenance
    metrics: Mapping[str, MetricBaseline]
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "profile": self.profile,
            "fingerprint": asdict(self.fingerprint),
            "provenance": asdict(self.provenance),
            "metrics": {
                k: {**asdict(m), "runs": list(m.runs), "summary": asdict(m.summary)}
                for k, m in sorted(self.metrics.items())
            },
        }


# --------------------------------------------------------------------------- reading


def repair_advice(path: Path) -> str:
    """What to do about an unusable baseline file: commands that work as written."""
    aside = path.with_name(path.name + ".corrupt")
    profile = path.stem
    history = path.parent / "history" / profile
    kept = sorted(history.glob("*.json")) if history.is_dir() else []
    older = f"; earlier versions are in {history} (newest: {kept[-1].name})" if kept else ""
    return (
        f"The file was not changed. To repair it, restore the committed copy with "
        f"`git checkout -- {shlex.quote(str(path))}`{older}; or move it aside with "
        f"`mv {shlex.quote(str(path))} {shlex.quote(str(aside))}` and record a new baseline "
        f"with `./dev perf --profile {shlex.quote(profile)} --update-baselines`"
    )


def parse_baseline(raw: Any, path: Path) -> Baseline:
    """Validate parsed JSON as a baseline file; BaselineError names file, field and fix."""
    try:
        return _parse(raw, path)
    except BaselineError as exc:
        raise BaselineError(f"{exc}. {repair_advice(path)}") from None


def _parse(raw: Any, path: Path) -> Baseline:
    schema.check_version(
        raw, SCHEMA_VERSION, file=path, error=BaselineError, hint="Upgrade servelab to read it"
    )
    baseline = schema.read(
        Baseline,
        raw,
        file=path,
        error=BaselineError,
        locate=schema.nested,
        ignore={MetricBaseline: frozenset({"summary"})},
    )
    for key, m in baseline.metrics.items():
        where = f"{path}: metrics[{key!r}]"
        if not 0 < m.threshold < 1:
            raise BaselineError(
                f"{where}: field 'threshold' must be within (0, 1), e.g. 0.05 (got {m.threshold})"
            )
        if m.key != key:
            raise BaselineError(f"{where}: key does not match its metric/shape ({m.key!r})")
    return baseline


def load_baseline(path: Path) -> Baseline | None:
    """The baseline at `path`; None when there is none; BaselineError when it is unusable."""
    text = read_text(path, error=BaselineError, what="baseline", missing_ok=True)
    if text is None:
        return None
    raw = parse_json(
        text, path=path, error=BaselineError, what="baseline", advice=repair_advice(path)
    )
    return parse_baseline(raw, path)
