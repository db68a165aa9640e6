"""Records that verify themselves (`servelab verify RECORD`).
(Over 400 lines: the checks of a record and the recipes that recompute its figures.)

A record folder is checked against itself, with nothing re-measured:

- **hashes**: `record.json`'s `integrity` block (`servelab.record_files.integrity`) against
  the bytes of `raw.jsonl`, each figure, each profile's fingerprint and engine identity, and
  the rest of the record; the source fingerprint says which servelab wrote it;
- **rows**: a row counted as complete (`error` null) must look complete: HTTP 200, token
  chunks, an end and a finish reason, and `[DONE]` seen where the row records it;
- **identities**: every figure's profile, engine, model and host match its result's
  fingerprint (a swapped identity fails);
- **figures**: each figure whose recipe is known (the perf tests' computations, by catalogue
  name) is recomputed from the rows with `servelab.metrics` and must equal the stored runs
  (relative 1e-9); each figure's value is the median of its runs;
- **verdicts**: each verdict with a baseline is judged again from the baseline runs it stores
  (`servelab.stats.compare_runs`) and must reach the stored status.

The hashes are not a signature: whoever rewrites a record can rewrite its hashes. What a
forger cannot fake is the recomputation: figures from rows, verdicts from runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from servelab import metrics
from servelab.baselines.schema import figure_key
from servelab.client import RequestRecord
from servelab.errors import RecordError
from servelab.record_build import figure_from_dict
from servelab.record_files import (
    INTEGRITY,
    content_hash,
    engine_identity,
    figure_hash_key,
    load_record,
    source_fingerprint,
    text_hash,
)
from servelab.stats import SESSION_PRIOR_DF, compare_runs

REL_TOL = 1e-9
Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Check:
    """One thing checked: where, what was found, and whether it holds."""

    status: Status
    where: str
    what: str

    def line(self) -> str:
        return f"{self.status.upper():7} {self.where}: {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    record: Path
    checks: tuple[Check, ...]

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == "failed")

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self, *, verbose: bool = False) -> list[str]:
        shown = [c.line() for c in self.checks if verbose or c.status != "ok"]
        n = {s: sum(c.status == s for c in self.checks) for s in ("ok", "failed", "skipped")}
        verdict = "VERIFIED" if self.ok else "FAILED"
        return [
            *shown,
            f"{verdict}: {self.record}: {n['ok']} checks hold, {n['failed']} failed, "
            f"{n['skipped']} not recomputable",
        ]


def verify_record(path: Path) -> VerifyReport:
    """Verify a record folder (or its record.json). A record that cannot be read raises
    `RecordError`; everything else is a check in the report."""
    record = load_record(path)  # a folder or its record.json; a missing one is a RecordError
    folder = path if path.is_dir() else path.parent
    raw = folder / "raw.jsonl"
    try:
        rows_text = raw.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordError(
            f"{raw}: cannot read the raw rows ({exc}); a record folder holds raw.jsonl"
        ) from None
    return VerifyReport(folder, tuple(verify_data(record, rows_text)))


def verify_data(record: Mapping[str, Any], rows_text: str) -> list[Check]:
    """Every check of one record (the parsed record.json) and its raw.jsonl text."""
    checks = check_hashes(record, rows_text)
    rows, parse = parse_rows(rows_text)
    checks += parse
    checks += check_rows(rows)
    checks += check_identities(record)
    checks += check_figures(record, rows)
    checks += check_verdicts(record)
    return checks


# --------------------------------------------------------------------------- hashes


def check_hashes(record: Mapping[str, Any], rows_text: str) -> list[Check]:
    stored = record.get(INTEGRITY)
    if not isinstance(stored, Mapping):
        return [
            Check(
                "failed",
                "record.json",
                f"no {INTEGRITY!r} block: written before records carried content hashes, "
                "or removed; nothing vouches for its rows and figures",
            )
        ]
    out: list[Check] = []

    def same(where: str, what: str, want: Any, got: Any) -> None:
        if want == got:
            out.append(Check("ok", where, f"{what} hash matches"))
        else:
            out.append(
                Check("failed", where, f"{what} changed since written (stored {want}, now {got})")
            )

    same("raw.jsonl", "rows", stored.get("rows"), text_hash(rows_text))
    same("raw.jsonl", "row count", stored.get("rows_count"), rows_text.count("\n"))
    results = record.get("results", [])
    figs = {figure_hash_key(r["profile"], f): f for r in results for f in r.get("figures", [])}
    stored_figs = stored.get("figures") or {}
    for key in sorted(set(figs) | set(stored_figs)):
        if key not in figs:
            out.append(Check("failed", f"figure {key}", "in the hashes but not in the record"))
        elif key not in stored_figs:
            out.append(Check("failed", f"figure {key}", "in the record but not in the hashes"))
        else:
            same(f"figure {key}", "figure", stored_figs[key], content_hash(figs[key]))
    for r in results:
        p = r["profile"]
        prof = content_hash({"profile": p, "fingerprint": r.get("fingerprint")})
        same(f"profile {p}", "profile", (stored.get("profiles") or {}).get(p), prof)
        eng = content_hash(engine_identity(r))
        same(f"profile {p}", "engine identity", (stored.get("engines") or {}).get(p), eng)
    body = {k: v for k, v in record.items() if k != INTEGRITY}
    same("record.json", "record", stored.get("record"), content_hash(body))
    src = stored.get("source")
    if not (isinstance(src, str) and re.fullmatch(r"[0-9a-f]{64}", src)):
        out.append(Check("failed", "record.json", f"source fingerprint {src!r} is not a sha256"))
    elif src == source_fingerprint():
        out.append(Check("ok", "record.json", "written by this servelab source"))
    else:
        out.append(
            Check("ok", "record.json", f"written by another servelab source ({src[:12]}...)")
        )
    return out


# --------------------------------------------------------------------------- rows

_RECORD_FIELDS = {f.name for f in fields(RequestRecord)}
_REQUIRED = {f.name for f in fields(RequestRecord) if f.name not in ("comments", "worker")}


def parse_rows(rows_text: str) -> tuple[list[dict[str, Any]], list[Check]]:
    rows: list[dict[str, Any]] = []
    bad: list[Check] = []
    for i, line in enumerate(rows_text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            bad.append(Check("failed", f"raw.jsonl line {i}", f"not JSON ({exc})"))
            continue
        if not isinstance(row, dict):
            bad.append(Check("failed", f"raw.jsonl line {i}", "not a JSON object"))
            continue
        rows.append({**row, "_line": i})
    return rows, bad


def to_request(row: Mapping[str, Any]) -> RequestRecord | None:
    """The client's record of one row; None for a row of another shape."""
    if not set(row) >= _REQUIRED:
        return None
    body = {k: row[k] for k in _RECORD_FIELDS if k in row}
    body["chunk_ns"] = tuple(body["chunk_ns"])
    body["chunk_tokens"] = tuple(body["chunk_tokens"])
    return RequestRecord(**body)


def incomplete_reasons(row: Mapping[str, Any]) -> list[str]:
    """Why a row counted as complete (`error` null) is not: what the client requires of a
    success (HTTP 200, a token chunk, `[DONE]`) as far as the row shows it."""
    if row.get("error") is not None:
        return []
    why = []
    if row.get("status_code") != 200:
        why.append(f"HTTP status {row.get('status_code')!r}, not 200")
    chunks = row.get("chunk_ns") or []
    if not chunks or row.get("first_token_ns") is None:
        why.append("no token chunk")
    elif row.get("end_ns") != chunks[-1]:
        why.append("its end is not its last token chunk")
    for flag in ("seen_done", "done_seen"):
        if flag in row and row[flag] is not True:
            why.append("the stream ended before [DONE]")
    if row.get("done_ns") is None:
        why.append("the stream has no end (no done_ns)")
    elif row.get("end_ns") is not None and row["done_ns"] < row["end_ns"]:
        why.append("the stream ended before its last token chunk")
    if row.get("finish_reason") is None:
        why.append("no finish reason (a stream cut before its last chunk)")
    return why


def check_rows(rows: Sequence[Mapping[str, Any]]) -> list[Check]:
    out = []
    for row in rows:
        if to_request(row) is None:
            continue
        why = incomplete_reasons(row)
        where = f"raw.jsonl line {row['_line']}"
        if why:
            out.append(Check("failed", where, "counted as complete, but " + "; ".join(why)))
    out.append(Check("ok", "raw.jsonl", f"{len(rows)} rows read; every success looks complete"))
    return out if len(out) == 1 else out[:-1]


# --------------------------------------------------------------------------- identities


def check_identities(record: Mapping[str, Any]) -> list[Check]:
    out = []
    for r in record.get("results", []):
        fp = r.get("fingerprint") or {}
        for f in r.get("figures", []):
            where = f"figure {figure_hash_key(r['profile'], f)}"
            ident = f.get("identity") or {}
            want = {
                "profile": r["profile"],
                "engine": fp.get("engine"),
                "model": fp.get("model"),
                "host": fp.get("host_key"),
            }
            diffs = [
                f"{k} {ident.get(k)!r} vs the result's {v!r}"
                for k, v in want.items()
                if v is not None and ident.get(k) != v
            ]
            try:
                key_ok = f.get("key") == figure_key(figure_from_dict(f))
            except RecordError as exc:
                out.append(Check("failed", where, str(exc)))
                continue
            if not key_ok:
                diffs.append(f"key {f.get('key')!r} does not name its metric and shape")
            if diffs:
                out.append(Check("failed", where, "identity swapped: " + "; ".join(diffs)))
            else:
                out.append(Check("ok", where, "identity matches its result"))
    return out


# --------------------------------------------------------------------------- figures

PerRun = Callable[[Sequence[RequestRecord]], float | None]
PerRequest = Callable[[RequestRecord], float | None]


def _dist_median(attr: str) -> PerRun:
    def value(recs: Sequence[RequestRecord]) -> float | None:
        d = getattr(metrics.compute(recs, 0, 0), attr)
        return None if d is None else float(d.median)

    return value


def _plain(attr: str) -> PerRun:
    def value(recs: Sequence[RequestRecord]) -> float | None:
        v = getattr(metrics.compute(recs, 0, 0), attr)
        return None if v is None else float(v)

    return value


def _ttft_ms(r: RequestRecord) -> float | None:
    t = metrics.ttft_s(r)
    return None if t is None else 1000 * t


@dataclass(frozen=True)
class Recipe:
    """How the perf test `test` computes the figures named `pattern` from its rows: per run
    (rows grouped by their `run` label) or per request; `axis` is the row label the name's
    number selects (`prompt_length`, `concurrency`)."""

    pattern: str
    test: str
    per_run: PerRun | None = None
    per_request: PerRequest | None = None
    axis: str | None = None


#: The computations of perf/test_decode.py, test_prefill.py and test_concurrency.py. The
#: throughput figures of the sweep divide by the run's dispatch time, which the rows do not
#: carry, so they are not recomputed.
RECIPES = (
    Recipe("decode_tok_s", "test_decode_c1", per_run=_dist_median("decode_tok_s")),
    Recipe("median_tpot_ms", "test_decode_c1", per_run=_dist_median("tpot_ms")),
    Recipe(r"ttft_ms_p(\d+)", "test_prefill_ladder", per_request=_ttft_ms, axis="prompt_length"),
    Recipe(
        r"prefill_tok_s_p(\d+)",
        "test_prefill_ladder",
        per_request=metrics.prefill_rate,
        axis="prompt_length",
    ),
    Recipe(
        r"median_ttft_ms_c(\d+)",
        "test_concurrency_sweep",
        per_run=_dist_median("ttft_ms"),
        axis="concurrency",
    ),
    Recipe(
        r"median_tpot_ms_c(\d+)",
        "test_concurrency_sweep",
        per_run=_dist_median("tpot_ms"),
        axis="concurrency",
    ),
    Recipe(
        r"wall_aggregate_tok_s_c(\d+)",
        "test_concurrency_sweep",
        per_run=_plain("wall_aggregate_tok_s"),
        axis="concurrency",
    ),
)


def recipe_of(metric: str) -> tuple[Recipe, int | None] | None:
    for rc in RECIPES:
        m = re.fullmatch(rc.pattern, metric)
        if m:
            return rc, int(m.group(1)) if m.groups() else None
    return None


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def recompute(
    rc: Recipe, number: int | None, rows: Sequence[Mapping[str, Any]]
) -> list[float] | None:
    """The figure's runs recomputed from the rows; None when no row belongs to it."""
    mine = [r for r in rows if r.get("test") == rc.test]
    if rc.axis is not None:
        mine = [r for r in mine if r.get(rc.axis) == number]
    if not mine:
        return None
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in mine:
        groups.setdefault(r.get("run") if rc.per_run else None, []).append(r)
    nan = math.nan
    runs: list[list[RequestRecord]] = []
    for rows_of_run in groups.values():
        # A run measured again (Measurement.keep's `remeasure`) counts instead of the first.
        again = [r for r in rows_of_run if r.get("again")]
        chosen = again or rows_of_run
        runs.append([rec for r in chosen if (rec := to_request(r)) is not None])
    if rc.per_request is not None:
        f = rc.per_request
        return [nan if (v := f(rec)) is None else v for rs in runs for rec in rs if rec.success]
    assert rc.per_run is not None
    g = rc.per_run
    return [nan if (v := g(rs)) is None else v for rs in runs]


def _subsequence(stored: Sequence[float], computed: Sequence[float]) -> bool:
    it = iter(computed)
    return all(any(close(s, c) for c in it) for s in stored)


def check_figures(record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Check]:
    out = []
    results = record.get("results", [])
    for r in results:
        profile = r["profile"]
        labeled = [x for x in rows if "profile" in x]
        if labeled:
            mine: Sequence[Mapping[str, Any]] = [x for x in labeled if x["profile"] == profile]
        elif len(results) > 1:
            mine = []
        else:
            mine = rows
        for f in r.get("figures", []):
            where = f"figure {figure_hash_key(profile, f)}"
            out += _check_value(where, f)
            found = recipe_of(str(f.get("metric")))
            if found is None:
                out.append(Check("skipped", where, "no recipe: not recomputable from rows"))
                continue
            if not mine and len(results) > 1 and not labeled:
                out.append(
                    Check(
                        "skipped",
                        where,
                        "rows carry no profile label and the record has "
                        "several profiles: cannot tell whose rows",
                    )
                )
                continue
            rc, number = found
            computed = recompute(rc, number, mine)
            if computed is None:
                out.append(Check("skipped", where, f"no rows of {rc.test} in raw.jsonl"))
                continue
            stored = [float(x) for x in f.get("runs", [])]
            out.append(_compare_runs(where, f, stored, computed))
    return out


def _check_value(where: str, f: Mapping[str, Any]) -> list[Check]:
    runs = [float(x) for x in f.get("runs", [])]
    finite = sorted(v for v in runs if math.isfinite(v))
    want = None
    if finite:
        k = len(finite)
        want = finite[k // 2] if k % 2 else (finite[k // 2 - 1] + finite[k // 2]) / 2
    got = f.get("value")
    if (want is None) != (got is None) or (
        want is not None and got is not None and not close(want, float(got))
    ):
        return [Check("failed", where, f"value {got!r} is not the median of its runs ({want!r})")]
    return []


def _compare_runs(
    where: str, f: Mapping[str, Any], stored: list[float], computed: list[float]
) -> Check:
    if len(stored) == len(computed) and all(map(close, stored, computed)):
        return Check("ok", where, f"{len(stored)} run(s) recomputed from the rows")
    dropped = any("dropped" in str(n) for n in f.get("notes", []))
    if dropped and len(stored) < len(computed) and _subsequence(stored, computed):
        return Check(
            "ok",
            where,
            f"{len(stored)} run(s) recomputed from the rows "
            f"({len(computed) - len(stored)} dropped, as its notes say)",
        )
    return Check(
        "failed",
        where,
        f"stored runs {_short(stored)} are not what the rows give: {_short(computed)}",
    )


def _short(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.10g}" for v in values) + "]"


# --------------------------------------------------------------------------- verdicts

JUDGED = ("regression", "improvement", "no change", "inconclusive")
#: Without the history behind a verdict's drift, its degrees of freedom are searched: the
#: prior's alone, or pooled with up to this many past sessions.
_MAX_HISTORY = 500


def check_verdicts(record: Mapping[str, Any]) -> list[Check]:
    out = []
    for r in record.get("results", []):
        for f in r.get("figures", []):
            v = f.get("verdict")
            if isinstance(v, Mapping):
                out.append(check_verdict(f"figure {figure_hash_key(r['profile'], f)}", f, v))
    return out


def check_verdict(where: str, f: Mapping[str, Any], v: Mapping[str, Any]) -> Check:
    status = v.get("status")
    base, cmp = v.get("baseline"), v.get("comparison")
    if status == "no baseline":
        if base is not None or cmp is not None:
            return Check("failed", where, "verdict 'no baseline' stores a baseline it judged")
        return Check("ok", where, "verdict 'no baseline' (nothing to judge)")
    if status == "refused":
        if cmp is not None:
            return Check("failed", where, "verdict 'refused' stores a comparison it made")
        return Check("ok", where, "verdict 'refused' (the refusal is in its text)")
    if status == "inconclusive" and base is None and cmp is None:
        return check_not_judged(where, f, v)
    if status not in JUDGED:
        return Check("failed", where, f"verdict status {status!r} is not one servelab gives")
    if not isinstance(base, Mapping) or not isinstance(cmp, Mapping):
        return Check("failed", where, f"verdict {status!r} stores no baseline runs to judge by")
    fig = figure_from_dict(f)
    cv = float(cmp.get("session_cv", 0.0))
    dfs = [math.inf] if cv == 0 else [SESSION_PRIOR_DF + k for k in range(_MAX_HISTORY)]
    stored_p = cmp.get("p_worse")
    best = None
    for df in dfs:
        c = compare_runs(
            [float(x) for x in base["runs"]],
            fig.runs,
            fig.direction,
            threshold=float(cmp["threshold"]),
            alpha=float(cmp["alpha"]),
            session_cv=cv,
            session_df=df,
        )
        gap = 0.0 if stored_p is None or c.p_worse is None else abs(c.p_worse - float(stored_p))
        if best is None or gap < best[0]:
            best = (gap, c)
        if gap == 0.0:
            break
    assert best is not None
    c = best[1]
    problems = []
    # Records written before 2026-12-06 called an underpowered comparison whose interval
    # reaches past the threshold "no change"; the rule now says "inconclusive" (issue 19).
    older_rule = status == "no change" and c.outcome == "inconclusive"
    if c.outcome != status and not older_rule:
        problems.append(f"status {status!r}, but the stored runs give {c.outcome!r}")
    if cmp.get("outcome") != status:
        problems.append(f"its comparison says {cmp.get('outcome')!r}")
    stored_change = cmp.get("change")
    if (stored_change is None) != (c.change is None) or (
        c.change is not None
        and stored_change is not None
        and not close(float(stored_change), c.change)
    ):
        problems.append(f"change {stored_change!r}, recomputed {c.change!r}")
    if stored_p is not None and c.p_worse is not None and not close_p(float(stored_p), c.p_worse):
        problems.append(f"p_worse {stored_p!r}, recomputed {c.p_worse!r}")
    if problems:
        return Check("failed", where, "forged verdict: " + "; ".join(problems))
    if older_rule:
        return Check(
            "ok",
            where,
            "verdict 'no change' recomputed from the baseline runs as 'inconclusive' (the rule "
            "before 2026-12-06 called an underpowered comparison 'no change')",
        )
    return Check("ok", where, f"verdict {status!r} recomputed from the baseline runs")


def check_not_judged(where: str, f: Mapping[str, Any], v: Mapping[str, Any]) -> Check:
    """Issue 24: an INVALID figure is not judged. Its note must be there, its verdict must
    name it, and a "not certifiable" reason must hold for its runs (no forged INVALID)."""
    from servelab.certify import figure_validity, invalid_note

    note = invalid_note([str(n) for n in f.get("notes", [])])
    if note is None:
        return Check(
            "failed",
            where,
            "verdict 'inconclusive' judged nothing, but the figure is not INVALID: forged verdict",
        )
    if note not in str(v.get("text", "")):
        return Check("failed", where, "the verdict does not name the figure's INVALID note")
    n = sum(math.isfinite(float(x)) for x in f.get("runs", []))
    if "a verdict needs at least" in note and figure_validity(str(f["metric"]), samples=n).valid:
        return Check("failed", where, f"forged INVALID: its {n} runs are enough for a verdict")
    return Check("ok", where, f"not judged: {note}")


def close_p(a: float, b: float) -> bool:
    """p-values agree to 1e-6 relative (the drift's degrees of freedom are searched)."""
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-300)
