"""Stored baselines, keyed by (host key, profile), and verdicts against them.

One JSON file per `baselines/<host key>/<profile>.json`. It holds the stack fingerprint the
numbers belong to, provenance, and per metric its direction, unit, shape, per-run values,
summary and threshold. Files are validated at load (unknown schema, missing or extra fields,
wrong types: a BaselineError naming the file and the field). Updates happen under a file lock,
keep the previous file in `history/`, and replace the file atomically.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from servelab.errors import BaselineError
from servelab.figures import Direction, Figure, Shape
from servelab.stats import DEFAULT_THRESHOLD, MIN_RUNS, Comparison, compare_runs

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


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- loading


def _field(d: Mapping[str, Any], name: str, types: type | tuple[type, ...], where: str) -> Any:
    if name not in d:
        raise BaselineError(f"{where}: missing field {name!r}")
    v = d[name]
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _as_tuple(types))
    if not ok:
        raise BaselineError(f"{where}: field {name!r} has the wrong type ({type(v).__name__})")
    return v


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _no_extra(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise BaselineError(f"{where}: unknown field(s) {extra}")


def _opt_str(d: Mapping[str, Any], name: str, where: str) -> str | None:
    v = d.get(name)
    if v is not None and not isinstance(v, str):
        raise BaselineError(f"{where}: field {name!r} must be a string or null")
    return v


def parse_baseline(raw: Any, path: Path) -> Baseline:
    where = str(path)
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: top level must be a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BaselineError(
            f"{where}: field 'schema_version' is {version!r}; this servelab reads version "
            f"{SCHEMA_VERSION}. Upgrade servelab, or regenerate the file with --update-baselines"
        )
    _no_extra(raw, ("schema_version", "profile", "fingerprint", "provenance", "metrics"), where)
    profile = _field(raw, "profile", str, where)
    fp = _field(raw, "fingerprint", dict, where)
    fw = f"{where}: fingerprint"
    _no_extra(fp, [f.name for f in fields(Fingerprint)], fw)
    fingerprint = Fingerprint(
        _field(fp, "host_key", str, fw),
        _field(fp, "engine", str, fw),
        _field(fp, "model", str, fw),
        _opt_str(fp, "args_hash", fw),
        _opt_str(fp, "weights_sha256", fw),
        _opt_str(fp, "driver", fw),
        _opt_str(fp, "patches", fw),
    )
    pv = _field(raw, "provenance", dict, where)
    pw = f"{where}: provenance"
    _no_extra(pv, [f.name for f in fields(Provenance)], pw)
    prov = Provenance(*(_field(pv, f.name, str, pw) for f in fields(Provenance)))
    ms = _field(raw, "metrics", dict, where)
    metrics = {}
    for key, m in ms.items():
        mw = f"{where}: metrics[{key!r}]"
        if not isinstance(m, dict):
            raise BaselineError(f"{mw} must be an object")
        _no_extra(m, [*(f.name for f in fields(MetricBaseline)), "summary"], mw)
        direction = _field(m, "direction", str, mw)
        if direction not in ("higher", "lower"):
            raise BaselineError(f"{mw}: field 'direction' must be 'higher' or 'lower'")
        runs = _field(m, "runs", list, mw)
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in runs):
            raise BaselineError(f"{mw}: field 'runs' must be a list of numbers")
        sh = _field(m, "shape", dict, mw)
        sw = f"{mw}.shape"
        _no_extra(sh, [f.name for f in fields(Shape)], sw)
        shape = Shape(
            _opt_int(sh, "prompt_tokens", sw),
            _opt_int(sh, "output_tokens", sw),
            _field(sh, "concurrency", int, sw),
            _opt_int(sh, "context_tokens", sw),
        )
        threshold = float(_field(m, "threshold", (int, float), mw))
        if not 0 < threshold < 1:
            raise BaselineError(f"{mw}: field 'threshold' must be within (0, 1), e.g. 0.05")
        mb = MetricBaseline(
            _field(m, "metric", str, mw),
            _field(m, "title", str, mw),
            _field(m, "unit", str, mw),
            direction,
            shape,
            _field(m, "warm", bool, mw),
            tuple(float(r) for r in runs),
            threshold,
            _field(m, "updated", str, mw),
            str(m.get("definition", "")),
        )
        if mb.key != key:
            raise BaselineError(f"{mw}: key does not match its metric/shape ({mb.key!r})")
        metrics[key] = mb
    return Baseline(profile, fingerprint, prov, metrics, version)


def _opt_int(d: Mapping[str, Any], name: str, where: str) -> int | None:
    v = d.get(name)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise BaselineError(f"{where}: field {name!r} must be an integer or null")
    return v


def load_baseline(path: Path) -> Baseline | None:
    """The baseline at `path`; None when there is none; BaselineError when it is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read baseline ({exc})") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise BaselineError(
            f"{path}: corrupt or truncated baseline JSON ({exc}); restore it from "
            f"{path.parent / 'history'} or git, or regenerate with --update-baselines"
        ) from None
    return parse_baseline(raw, path)


# --------------------------------------------------------------------------- verdicts

Status = Literal["regression", "improvement", "no change", "inconclusive", "no baseline", "refused"]


@dataclass(frozen=True)
class Verdict:
    figure: Figure
    status: Status
    text: str
    baseline: MetricBaseline | None = None
    comparison: Comparison | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("regression", "refused")


def judge(
    fig: Figure,
    baseline: Baseline | None,
    fingerprint: Fingerprint,
    path: Path,
    *,
    threshold: float | None = None,
) -> Verdict:
    """Compare one figure with its stored baseline (refusing across fingerprints)."""
    key = figure_key(fig)
    if baseline is None:
        return Verdict(fig, "no baseline", f"no baseline at {path}: {CREATE_HINT}")
    diffs = baseline.fingerprint.differences(fingerprint)
    if baseline.profile != fig.identity.profile:
        diffs.insert(
            0, f"profile: baseline {baseline.profile!r} vs this run {fig.identity.profile!r}"
        )
    if diffs:
        return Verdict(
            fig,
            "refused",
            f"comparison refused: {path} was measured on another stack; differing "
            f"fields: {'; '.join(diffs)}. Rerun on the baseline's stack, or "
            f"record a new baseline with --update-baselines",
        )
    mb = baseline.metrics.get(key)
    if mb is None:
        return Verdict(fig, "no baseline", f"{path} has no entry {key!r}: {CREATE_HINT}")
    if mb.direction != fig.direction or mb.unit != fig.unit:
        return Verdict(
            fig,
            "refused",
            f"comparison refused: {path} metrics[{key!r}] is {mb.unit} "
            f"({mb.direction} is better), this run is {fig.unit} ({fig.direction})",
        )
    cmp = compare_runs(
        mb.runs,
        fig.runs,
        fig.direction,
        threshold=threshold if threshold is not None else mb.threshold,
    )
    return Verdict(fig, cmp.outcome, cmp.describe(fig.direction), mb, cmp)


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class UpdateResult:
    path: Path
    history: Path | None
    diff: tuple[str, ...]


def servelab_commit() -> str:
    """servelab's git commit (`-dirty` with local changes); SERVELAB_COMMIT overrides."""
    if os.environ.get("SERVELAB_COMMIT"):
        return os.environ["SERVELAB_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def who() -> str:
    by = os.environ.get("SERVELAB_BY")
    if by:
        return by
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class BaselineStore:
    root: Path
    lock_timeout_s: float = 60.0

    def path(self, host_key: str, profile: str) -> Path:
        for part, what in ((host_key, "host key"), (profile, "profile")):
            if not part or "/" in part or part.startswith("."):
                raise BaselineError(f"invalid {what} {part!r} for a baseline path")
        return self.root / host_key / f"{profile}.json"

    def load(self, host_key: str, profile: str) -> Baseline | None:
        path = self.path(host_key, profile)
        baseline = load_baseline(path)
        if baseline is not None and baseline.fingerprint.host_key != host_key:
            raise BaselineError(
                f"{path}: field 'fingerprint.host_key' is {baseline.fingerprint.host_key!r} "
                f"but the file sits under host key {host_key!r}: it belongs to another host"
            )
        return baseline

    def update(
        self,
        profile: str,
        fingerprint: Fingerprint,
        provenance: Provenance,
        figures: Sequence[Figure],
        *,
        thresholds: Mapping[str, float] | None = None,
        min_runs: int = MIN_RUNS,
    ) -> UpdateResult:
        """Write `figures` as the baseline of `profile` on this host (merge under a lock)."""
        from filelock import FileLock, Timeout

        short = [
            f"{figure_key(f)} ({len(f.runs)} runs)"
            for f in figures
            if sum(math.isfinite(r) for r in f.runs) < min_runs
        ]
        if short:
            raise BaselineError(
                f"refusing to write baseline for {profile!r}: every metric needs at least "
                f"{min_runs} runs, each a fresh measurement; too few: {', '.join(short)}. "
                f"Rerun with --runs {max(min_runs, 3)} or more"
            )
        if not figures:
            raise BaselineError(f"refusing to write baseline for {profile!r}: no figures")
        path = self.path(fingerprint.host_key, profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(path) + ".lock", timeout=self.lock_timeout_s):
                return self._update_locked(
                    path, profile, fingerprint, provenance, figures, thresholds or {}
                )
        except Timeout:
            raise BaselineError(
                f"{path}: another process holds the update lock "
                f"{path}.lock for over {self.lock_timeout_s:.0f} s"
            ) from None

    def _update_locked(
        self,
        path: Path,
        profile: str,
        fingerprint: Fingerprint,
        provenance: Provenance,
        figures: Sequence[Figure],
        thresholds: Mapping[str, float],
    ) -> UpdateResult:
        old = self.load(fingerprint.host_key, profile)  # a corrupt file raises: nothing written
        diff: list[str] = []
        kept: dict[str, MetricBaseline] = {}
        if old is not None:
            changes = old.fingerprint.differences(fingerprint)
            if changes:
                diff.append("stack changed; earlier metrics dropped: " + "; ".join(changes))
            else:
                kept = dict(old.metrics)
        else:
            diff.append(f"new baseline file {path}")
        for fig in figures:
            key = figure_key(fig)
            prev = kept.get(key)
            threshold = thresholds.get(fig.metric) or (
                prev.threshold if prev else DEFAULT_THRESHOLD
            )
            new = MetricBaseline.from_figure(fig, threshold, provenance.date)
            diff.append(_diff_line(key, prev, new))
            kept[key] = new
        baseline = Baseline(profile, fingerprint, provenance, kept)
        history = None
        if old is not None:
            stamp = old.provenance.date.replace(":", "").replace("-", "")
            history = path.parent / "history" / profile / f"{stamp}-{int(time.time_ns())}.json"
            atomic_write_text(history, path.read_text(encoding="utf-8"))
        atomic_write_text(path, json.dumps(baseline.to_json(), indent=2, sort_keys=True) + "\n")
        return UpdateResult(path, history, tuple(diff))


def _diff_line(key: str, prev: MetricBaseline | None, new: MetricBaseline) -> str:
    med = new.summary.median
    if prev is None:
        return f"+ {key}: {med:.4g} {new.unit} (n={len(new.runs)}, new)"
    old_med = prev.summary.median
    change = f"{(med / old_med - 1) * 100:+.1f}%" if old_med else "n/a"
    return (
        f"~ {key}: {old_med:.4g} -> {med:.4g} {new.unit} ({change}; "
        f"n={len(prev.runs)} -> {len(new.runs)})"
    )
