"""Reports: the end-of-session terminal table and a self-contained HTML report.

The HTML file embeds its plots as base64 PNGs (no external assets): throughput and TPOT
against concurrency, TTFT against prompt length, and every metric against its baseline band.
It is built from saved records only, so `servelab report` works outside pytest.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Mapping, Sequence
from typing import Any

from servelab.baselines import Verdict, figure_key
from servelab.figures import Figure
from servelab.records import is_rate, record_figures
from servelab.redact import Redactor

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


def terminal_table(judged: Sequence[Figure | Verdict]) -> list[str]:
    header = ("metric", "value (median)", "baseline (median)", "change (geomean)", "verdict")
    rows = [header, *terminal_rows(judged)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new(w: float = 6.0, h: float = 3.6) -> Any:
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(w, h))


def _series_plot(figures: Sequence[Figure], title: str, xlabel: str, x_of: str) -> str | None:
    """One line per (profile, metric, unit); x from the shape; error bars = run range."""
    groups: dict[tuple[str, str, str], list[Figure]] = {}
    for f in figures:
        groups.setdefault((f.identity.profile, f.metric, f.unit), []).append(f)
    if not groups:
        return None
    fig = _new()
    ax = fig.add_subplot()
    for (profile, metric, unit), fs in sorted(groups.items()):
        pts = sorted(
            (getattr(f.shape, x_of), f.value, min(f.runs), max(f.runs))
            for f in fs
            if f.value is not None and getattr(f.shape, x_of) is not None
        )
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        lo = [p[1] - p[2] for p in pts]
        hi = [p[3] - p[1] for p in pts]
        ax.errorbar(
            xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{profile}: {metric} ({unit})"
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    units = sorted({unit for _, _, unit in groups})
    ax.set_ylabel(" / ".join(units))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _band_plot(fig_: Figure, verdict: Mapping[str, Any] | None) -> str:
    fig = _new(4.2, 2.6)
    ax = fig.add_subplot()
    runs = list(fig_.runs)
    base = (verdict or {}).get("baseline")
    if base:
        med = float(base["median"])
        thr = float(base["threshold"])
        ax.axhspan(
            float(base["min"]),
            float(base["max"]),
            color="tab:blue",
            alpha=0.15,
            label="baseline run range",
        )
        ax.axhspan(
            med * (1 - thr),
            med * (1 + thr),
            color="tab:green",
            alpha=0.12,
            label=f"baseline median ±{thr * 100:.0f}%",
        )
        ax.axhline(med, color="tab:blue", lw=1, label="baseline median")
        ax.scatter([0] * len(base["runs"]), base["runs"], color="tab:blue", s=12)
    ax.scatter([1] * len(runs), runs, color="tab:red", s=12, label="this run")
    if fig_.value is not None:
        ax.hlines(fig_.value, 0.8, 1.2, color="tab:red")
    ax.set_xticks([0, 1], ["baseline", "this run"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel(fig_.unit)
    status = (verdict or {}).get("status", "no baseline")
    ax.set_title(f"{fig_.metric} ({fig_.shape.describe()}): {status}", fontsize=8)
    ax.legend(fontsize=6, loc="best")
    return _png(fig)


# --------------------------------------------------------------------------- html

_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
.regression,.refused{background:#fdd}.improvement{background:#dfd}
img{max-width:100%}.bands img{width:32%;min-width:300px}"""


def render_html(records: Sequence[Mapping[str, Any]], redactor: Redactor | None = None) -> str:
    """One self-contained HTML page for one or more saved records."""
    esc = html.escape
    red = redactor or Redactor(frozenset())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>servelab report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>servelab report</h1>",
    ]
    all_figs: list[tuple[Figure, dict[str, Any]]] = []
    for rec in records:
        rec = red.data(rec)
        s = rec["session"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(s["finished_at"])))
        parts.append(f"<h2>Session {esc(when)} — host {esc(rec['host']['key'])}</h2>")
        parts.append(
            f"<p>Command: <code>{esc(s['command'])}</code>; servelab "
            f"{esc(s['servelab_commit'])}; exit status {s['exit_status']}"
            f"{' (interrupted)' if s['interrupted'] else ''}</p>"
        )
        if s["invalid_reasons"]:
            parts.append(
                "<p class='regression'>Invalid run: "
                + esc("; ".join(s["invalid_reasons"]))
                + "</p>"
            )
        for res in rec["results"]:
            parts.append(f"<h3>{esc(res['profile'])}</h3><table>")
            parts += [
                f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                for k, v in res["community"].items()
            ]
            parts.append("</table>")
        figs = record_figures(rec)
        all_figs += figs
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
    figures = [f for f, _ in all_figs]
    plots = [
        (
            "Throughput against concurrency",
            _series_plot(
                [f for f in figures if is_rate(f)],
                "throughput vs concurrency",
                "concurrent requests",
                "concurrency",
            ),
        ),
        (
            "TPOT against concurrency",
            _series_plot(
                [f for f in figures if "tpot" in f.metric],
                "TPOT vs concurrency",
                "concurrent requests",
                "concurrency",
            ),
        ),
        (
            "TTFT against prompt length",
            _series_plot(
                [f for f in figures if "ttft" in f.metric],
                "TTFT vs prompt length",
                "prompt tokens",
                "prompt_tokens",
            ),
        ),
    ]
    parts.append("<h2>Plots</h2>")
    for title, png in plots:
        if png is not None:
            parts.append(
                f"<h3>{esc(title)}</h3><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
            )
    if all_figs:
        parts.append("<h2>Each metric against its baseline band</h2><div class='bands'>")
        for f, d in all_figs:
            png = _band_plot(f, d.get("verdict"))
            parts.append(f"<img alt='{esc(figure_key(f))}' src='data:image/png;base64,{png}'>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return red.text("\n".join(parts))
