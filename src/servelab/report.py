"""Reports: the end-of-session terminal table and a self-contained HTML report.

The HTML file embeds its plots as base64 PNGs (no external assets): each metric family
against concurrency or prompt length (one curve per session, one panel per unit), a figure's
history across sessions, per-request distributions (TTFT, TPOT, ITL, E2EL from `raw.jsonl`)
and, where a baseline exists, each metric against its baseline band. Every plot has a table
beside it, and without matplotlib the tables alone are written. It is built from saved
records only, so `servelab report` works outside pytest.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from servelab import report_data, report_plots
from servelab.baselines import Verdict, figure_key
from servelab.certify import invalid_note
from servelab.figures import Figure
from servelab.records import record_figures
from servelab.redact import Redactor
from servelab.report_data import AXIS_LABEL, Axis, Distribution, History, Series

# --------------------------------------------------------------------------- terminal


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def terminal_rows(judged: Sequence[Figure | Verdict]) -> list[tuple[str, str, str, str, str]]:
    """(metric, value, baseline, change, verdict) per figure (a `Verdict` carries its figure;
    a bare `Figure` was not compared)."""
    rows = []
    for item in judged:
        f, v = (item.figure, item) if isinstance(item, Verdict) else (item, None)
        state = "warm" if f.warm else "cold"
        metric = f"{f.identity.profile}: {f.title} [{f.metric}]"
        value = f"{_fmt(f.value)} {f.unit} ({f.shape.describe()}, {state}, n={len(f.runs)})"
        base = change = "-"
        status = "not compared"
        if v is not None:
            status = v.status
            if v.baseline is not None:
                s = v.baseline.summary
                base = f"{_fmt(s.median)} {v.baseline.unit} (n={s.count})"
            if v.comparison is not None and v.comparison.change is not None:
                change = f"{v.comparison.change * 100:+.1f}%"
        rows.append((metric, value, base, change, status))
    return rows


def validity_cells(f: Figure) -> tuple[str, str]:
    """(VALID / INVALID / "not stated", its sample support in short) from a figure's notes
    (issue 24: `servelab.certify.validity_notes` wrote them; a figure from an older record or
    an import has none)."""
    status = "not stated"
    if invalid_note(f.notes) is not None:
        status = "INVALID"
    elif "VALID" in f.notes:
        status = "VALID"
    support = next((n for n in f.notes if n.startswith("support: ")), None)
    if support is None:
        return status, "-"
    short = support.removeprefix("support: ").split("; load: ")[0]
    return status, re.sub(r" \([^()]*\)", "", short)


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def terminal_table(judged: Sequence[Figure | Verdict]) -> list[str]:
    """The verdict table, then each figure's validity and sample support, then every INVALID
    figure's reasons and what to change."""
    header = ("metric", "value (median)", "baseline (median)", "change (geomean)", "verdict")
    out = _aligned([header, *terminal_rows(judged)])
    figs = [item.figure if isinstance(item, Verdict) else item for item in judged]
    if not figs:
        return out
    rows = [("metric", "validity", "sample support")]
    rows += [(f"{f.identity.profile}: {f.metric}", *validity_cells(f)) for f in figs]
    out += ["", *_aligned(rows)]
    bad = [(f, note) for f in figs if (note := invalid_note(f.notes)) is not None]
    if bad:
        out += ["", f"{len(bad)} INVALID figure(s), not judged and never a baseline:"]
        out += [f"  {f.identity.profile}: {note}" for f, note in bad]
    return out


# --------------------------------------------------------------------------- html

_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
.regression,.refused{background:#fdd}.improvement{background:#dfd}
.note{background:#ffd;padding:4px 8px}
img{max-width:100%}.bands img{width:32%;min-width:300px}"""

esc = html.escape

#: The series plots: (title, shape label on x, which family belongs).
_SERIES_PLOTS: tuple[tuple[str, Axis, Callable[[Series], bool]], ...] = (
    ("Throughput against concurrency", "concurrency", lambda s: "tok/s" in s.unit),
    ("TPOT against concurrency", "concurrency", lambda s: "tpot" in s.family),
    ("TTFT against concurrency", "concurrency", lambda s: "ttft" in s.family),
    ("TTFT against prompt length", "prompt_tokens", lambda s: "ttft" in s.family),
    ("Throughput against prompt length", "prompt_tokens", lambda s: "tok/s" in s.unit),
)


def _img(title: str, png: str | None) -> list[str]:
    if png is None:
        return []
    return [f"<img alt='{esc(title)}' src='data:image/png;base64,{png}'>"]


def _series_table(curves: Sequence[Series]) -> list[str]:
    out = ["<table><tr><th>series</th><th>unit</th><th>points (x: median [min, max] of runs)"]
    out[0] += "</th></tr>"
    for s in curves:
        pts = "; ".join(
            f"{p.x:g}: {_fmt(p.value)} [{_fmt(p.low)}, {_fmt(p.high)}] (n={p.runs})"
            for p in s.points
        )
        out.append(f"<tr><td>{esc(s.label)}</td><td>{esc(s.unit)}</td><td>{esc(pts)}</td></tr>")
    out.append("</table>")
    return out


def _series_section(curves: Sequence[Series], plots: bool) -> list[str]:
    parts = ["<h2>Metric families against the shape</h2>"]
    placed: set[int] = set()
    for title, axis, belongs in _SERIES_PLOTS:
        chosen = [s for s in curves if s.axis == axis and belongs(s) and id(s) not in placed]
        placed.update(id(s) for s in chosen)
        if chosen:
            parts.append(f"<h3>{esc(title)}</h3>")
            parts += _img(title, report_plots.series_png(chosen, title) if plots else None)
            parts += _series_table(chosen)
    for axis, label in AXIS_LABEL.items():
        rest = [s for s in curves if s.axis == axis and id(s) not in placed]
        if rest:
            title = f"Other metrics against {label}"
            parts.append(f"<h3>{esc(title)}</h3>")
            parts += _img(title, report_plots.series_png(rest, title) if plots else None)
            parts += _series_table(rest)
    if not curves:
        parts.append("<p>No metric was measured at more than one concurrency or prompt length.</p>")
    return parts


def _history_section(items: Sequence[History], sessions: Sequence[str], plots: bool) -> list[str]:
    parts = ["<h2>History across sessions</h2>"]
    groups: dict[tuple[str, str], list[History]] = {}
    for h in items:
        groups.setdefault((h.family, h.unit), []).append(h)
    for (fam, unit), group in sorted(groups.items()):
        title = f"{fam} [{unit}] by session"
        parts.append(f"<h3>{esc(title)}</h3>")
        parts += _img(title, report_plots.history_png(group, sessions, title) if plots else None)
    head = "".join(f"<th>{esc(s)}</th>" for s in sessions)
    parts.append(f"<table><tr><th>figure</th><th>unit</th>{head}</tr>")
    for h in items:
        by = dict(h.values)
        cells = "".join(f"<td>{_fmt(by.get(i))}</td>" for i in range(len(sessions)))
        parts.append(f"<tr><td>{esc(h.key)}</td><td>{esc(h.unit)}</td>{cells}</tr>")
    parts.append("</table>")
    return parts


def _distribution_section(dists: Sequence[Distribution], plots: bool) -> list[str]:
    parts = ["<h3>Per-request distributions (raw.jsonl)</h3>"]
    for name, unit in report_data.PER_REQUEST:
        mine = [d for d in dists if d.metric == name]
        if plots and mine:
            title = f"{name} per request [{unit}], empirical CDF"
            parts += _img(title, report_plots.ecdf_png(mine, title))
    parts.append(
        "<table><tr><th>metric</th><th>group</th><th>values</th><th>failed requests</th>"
        "<th>p50</th><th>p90</th><th>p99</th><th>max</th></tr>"
    )
    for d in dists:
        cells = "".join(f"<td>{_fmt(d.pct(p))}</td>" for p in (50, 90, 99))
        parts.append(
            f"<tr><td>{esc(d.metric)} ({esc(d.unit)})</td><td>{esc(d.group)}</td>"
            f"<td>{len(d.values)}</td><td>{d.failed}</td>{cells}<td>{_fmt(d.values[-1])}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _telemetry_section(rec: Mapping[str, Any], plots: bool) -> list[str]:
    """Issue 16 item 3: each run's accelerator telemetry (lab.telemetry)."""
    runs = report_data.telemetry_runs(rec)
    if not runs:
        return []
    parts = ["<h3>Accelerator telemetry per run</h3>"]
    by_test: dict[str, list[report_data.TelemetryRun]] = {}
    for r in runs:
        by_test.setdefault(r.test, []).append(r)
    for test, mine in by_test.items():
        title = f"{test}: power and memory over each run"
        parts += _img(title, report_plots.telemetry_png(mine, test) if plots else None)
    parts.append(
        "<table><tr><th>test</th><th>run</th><th>status</th><th>mean W</th><th>peak W</th>"
        "<th>energy J (method)</th><th>tok/J</th><th>peak GiB</th></tr>"
    )
    for r in runs:
        parts.append(
            f"<tr><td>{esc(r.test)}</td><td>{esc(r.labels)}</td><td>{esc(r.status)}</td>"
            f"<td>{_fmt(r.mean_power_w)}</td><td>{_fmt(r.peak_power_w)}</td>"
            f"<td>{_fmt(r.energy_j)} ({esc(str(r.energy_method))})</td>"
            f"<td>{_fmt(r.output_tok_per_j)}</td><td>{_fmt(r.peak_memory_gib)}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _load_curves_section(
    sessions: Sequence[tuple[str, Sequence[Figure]]], plots: bool
) -> list[str]:
    """Issue 17: each rate sweep's latency-throughput curve with its knee, and each capacity
    search's levels against its SLOs; a table for each."""
    from servelab import report_sweeps

    found = [s for label, figs in sessions for s in report_sweeps.sweeps(label, figs)]
    caps = [c for label, figs in sessions for c in report_sweeps.capacity_curves(label, figs)]
    if not found and not caps:
        return []
    parts = ["<h2>Load curves: the knee and capacity under SLOs</h2>"]
    for sw in found:
        title = f"{sw.profile}: latency against throughput, knee {_fmt(sw.knee_rps)} req/s"
        parts += [f"<h3>{esc(title)} ({esc(sw.session)})</h3>"]
        parts += _img(title, report_plots.knee_png(sw) if plots else None)
        names = sorted({k for p in sw.points for k in p.latency_ms})
        head = "".join(f"<th>{esc(n)} ms</th>" for n in names)
        parts.append(f"<table><tr><th>offered /s</th><th>achieved /s</th>{head}</tr>")
        for p in sw.points:
            star = " (knee)" if p is sw.knee_point() else ""
            cells = "".join(f"<td>{_fmt(p.latency_ms.get(n))}</td>" for n in names)
            parts.append(
                f"<tr><td>{p.offered_rps:g}{star}</td><td>{_fmt(p.achieved_rps)}</td>{cells}</tr>"
            )
        parts.append("</table>")
    for c in caps:
        slos = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in c.slos_ms.items())
        title = f"{c.profile}: capacity {_fmt(c.capacity_rps)} req/s under {slos}"
        parts += [f"<h3>{esc(title)} ({esc(c.session)})</h3>"]
        parts += _img(title, report_plots.capacity_png(c) if plots and c.levels else None)
        parts.append(
            "<table><tr><th>search</th><th>load /s</th><th>percentiles (verdict)</th></tr>"
        )
        for lv in c.levels:
            got = "; ".join(
                f"{k} {_fmt(v)} ms ({lv.verdicts.get(k)})" for k, v in lv.values_ms.items()
            )
            parts.append(
                f"<tr><td>{lv.search}</td><td>{lv.load_rps:g}</td><td>{esc(got)}</td></tr>"
            )
        parts.append("</table>")
    return parts


def _change_points_section(
    records: Sequence[tuple[str, Mapping[str, Any]]], plots: bool
) -> list[str]:
    """Issue 24 item 6: `servelab history` over the records in this report: each figure's
    series with its change points (a plot for each series that has one), in a table."""
    from servelab import history
    from servelab.errors import ConfigError

    series = [s for s in history.series_of(records) if len(s.points) > 1]
    if not series:
        return []
    parts = ["<h2>Change points over history (servelab history)</h2>"]
    try:
        series = [history.analyse(s) for s in series]
    except ConfigError as exc:
        return [*parts, f"<p class='note'>Change points not computed: {esc(str(exc))}</p>"]
    for s in series:
        if s.change_points:
            title = f"change points: {s.figure} ({s.profile} on {s.host})"
            parts += _img(title, report_plots.change_points_png(s) if plots else None)
    parts.append("<table><tr><th>series</th><th>points</th><th>change points</th></tr>")
    for s in series:
        found = "; ".join(c.describe() for c in s.change_points) or "none"
        where = f"{s.profile} on {s.host}: {s.figure}"
        parts.append(f"<tr><td>{esc(where)}</td><td>{len(s.points)}</td><td>{esc(found)}</td></tr>")
    parts += ["</table>", f"<p>{esc(history.lines(series)[-1])}</p>"]
    return parts


def _session_section(
    label: str, rec: Mapping[str, Any], figs: Sequence[tuple[Figure, dict[str, Any]]]
) -> list[str]:
    s = rec["session"]
    parts = [
        f"<h2>{esc(label)} — host {esc(rec['host']['key'])}</h2>",
        f"<p>Command: <code>{esc(s['command'])}</code>; servelab "
        f"{esc(s['servelab_commit'])}; exit status {s['exit_status']}"
        f"{' (interrupted)' if s['interrupted'] else ''}</p>",
    ]
    if s["invalid_reasons"]:
        reasons = esc("; ".join(s["invalid_reasons"]))
        parts.append(f"<p class='regression'>Invalid run: {reasons}</p>")
    for res in rec["results"]:
        parts.append(f"<h3>{esc(res['profile'])}</h3><table>")
        parts += [
            f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in res["community"].items()
        ]
        parts.append("</table>")
    parts.append(
        "<table><tr><th>metric</th><th>value</th><th>unit</th><th>shape</th>"
        "<th>warm/cold</th><th>runs</th><th>verdict</th></tr>"
    )
    for f, d in figs:
        v = d.get("verdict") or {}
        status = str(v.get("status", "not compared"))
        parts.append(
            f"<tr class='{esc(status.replace(' ', '-'))}'><td>{esc(f.title)} "
            f"(<code>{esc(f.metric)}</code>)</td><td>{_fmt(f.value)}</td>"
            f"<td>{esc(f.unit)}</td><td>{esc(f.shape.describe())}</td>"
            f"<td>{'warm' if f.warm else 'cold'}</td><td>{len(f.runs)}</td>"
            f"<td>{esc(str(v.get('text', 'not compared')))}</td></tr>"
        )
    parts.append("</table>")
    return parts


def render_html(
    records: Sequence[Mapping[str, Any]],
    redactor: Redactor | None = None,
    *,
    requests: Sequence[Sequence[Mapping[str, Any]]] = (),
) -> str:
    """One self-contained HTML page for one or more saved records; `requests[i]` holds the
    raw per-request rows of `records[i]` (its raw.jsonl) when they are at hand."""
    red = redactor or Redactor(frozenset())
    unavailable = report_plots.available()
    plots = unavailable is None
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>servelab report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>servelab report</h1>",
    ]
    if not plots:
        parts.append(
            f"<p class='note'>Plots unavailable: {esc(str(unavailable))}. Install "
            "<code>servelab[report]</code> for them; the tables below hold the same numbers.</p>"
        )
    sessions: list[tuple[str, list[Figure]]] = []
    banded: list[tuple[Figure, dict[str, Any]]] = []
    for i, raw_rec in enumerate(records):
        rec = red.data(raw_rec)
        label = report_data.session_label(i, rec)
        figs = record_figures(rec)
        sessions.append((label, [f for f, _ in figs]))
        banded += [(f, d) for f, d in figs if (d.get("verdict") or {}).get("baseline")]
        parts += _session_section(label, rec, figs)
        parts += _telemetry_section(rec, plots)
        rows = [red.data(dict(r)) for r in requests[i]] if i < len(requests) else []
        dists = report_data.distributions(rows)
        if dists:
            parts += _distribution_section(dists, plots)
    parts += _series_section(report_data.series(sessions), plots)
    parts += _load_curves_section(sessions, plots)
    if len(sessions) > 1:
        parts += _history_section(
            report_data.history(sessions), [label for label, _ in sessions], plots
        )
        named = [(label, red.data(r)) for (label, _), r in zip(sessions, records, strict=True)]
        parts += _change_points_section(named, plots)
    parts.append("<h2>Each metric against its baseline band</h2>")
    if not banded:
        parts.append("<p>No figure was judged against a stored baseline: no bands to draw.</p>")
    elif plots:
        parts.append("<div class='bands'>")
        for f, d in banded:
            parts += _img(figure_key(f), report_plots.band_png(f, d["verdict"]))
        parts.append("</div>")
    else:
        parts.append("<p>The verdict column of each session's table holds the comparison.</p>")
    parts.append("</body></html>\n")
    return red.text("\n".join(parts))
