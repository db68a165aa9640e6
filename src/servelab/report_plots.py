"""The report's plots as base64 PNGs (matplotlib's Agg canvas, no pyplot, no display).

matplotlib is optional (`servelab[report]`): `available()` says whether it imports, and the
report shows tables instead when it does not. One axis per unit: figures of different units
get their own panels, never a shared y axis.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from servelab.figures import Figure
from servelab.report_data import AXIS_LABEL, Distribution, History, Series, TelemetryRun


def available() -> str | None:
    """None when matplotlib imports; otherwise why it does not."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not importable ({exc})"
    return None


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _panels(n: int, w: float = 6.0, h: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure with n panels side by side (two per row)."""
    from matplotlib.figure import Figure as MplFigure

    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig = MplFigure(figsize=(w * cols, h * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def series_png(curves: Sequence[Series], title: str) -> str | None:
    fig = series_figure(curves, title)
    return None if fig is None else _png(fig)


def series_figure(curves: Sequence[Series], title: str) -> Any:
    """One panel per unit (ms and s never share an axis); one line per series (per session:
    two sessions never join into one line); error bars span the runs."""
    by_unit: dict[str, list[Series]] = {}
    for s in curves:
        by_unit.setdefault(s.unit, []).append(s)
    if not by_unit:
        return None
    sessions = {s.session for s in curves}
    one = next(iter(sessions)) if len(sessions) == 1 else None
    fig, axes = _panels(len(by_unit), h=4.2)
    for ax, (unit, group) in zip(axes, sorted(by_unit.items()), strict=True):
        for s in group:
            xs = [p.x for p in s.points]
            ys = [p.value for p in s.points]
            err = [[p.value - p.low for p in s.points], [p.high - p.value for p in s.points]]
            label = s.label if one is None else s.label.removeprefix(f"{one}: ")
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        axis = group[0].axis
        ax.set_title(f"{title} [{unit}]" + (f"\n{one}" if one else ""), fontsize=9)
        ax.set_xlabel(AXIS_LABEL[axis])
        ax.set_ylabel(unit)
        if axis == "concurrency":
            ax.set_xscale("log", base=2)
        xs_all = sorted({p.x for s in group for p in s.points})
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.grid(alpha=0.3)
        _legend_below(ax)
    return fig


def _legend_below(ax: Any) -> None:
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)


def history_png(items: Sequence[History], sessions: Sequence[str], title: str) -> str:
    """Each figure's median per session (x = session); one panel, one unit."""
    fig, (ax,) = _panels(1)
    for h in items:
        ax.plot([i for i, _ in h.values], [v for _, v in h.values], marker="o", label=h.key)
    ax.set_xticks(range(len(sessions)), [s.split(" (")[0] for s in sessions])
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(items[0].unit)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    return _png(fig)


def ecdf_png(dists: Sequence[Distribution], title: str) -> str:
    """Empirical CDF of one per-request metric, one curve per group."""
    fig, (ax,) = _panels(1)
    for d in dists:
        n = len(d.values)
        ax.step(d.values, [(i + 1) / n for i in range(n)], where="post", label=f"{d.group} (n={n})")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(dists[0].unit)
    ax.set_ylabel("share of requests")
    if min(d.values[0] for d in dists) > 0:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=6)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    return _png(fig)


def band_png(fig_: Figure, verdict: Mapping[str, Any]) -> str:
    """This run's values against the baseline's run range and its threshold band."""
    fig, (ax,) = _panels(1, 4.2, 2.6)
    base = verdict["baseline"]
    med = float(base["median"])
    thr = float(base["threshold"])
    ax.axhspan(
        float(base["min"]), float(base["max"]), color="tab:blue", alpha=0.15, label="baseline runs"
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
    runs = list(fig_.runs)
    ax.scatter([1] * len(runs), runs, color="tab:red", s=12, label="this run")
    if fig_.value is not None:
        ax.hlines(fig_.value, 0.8, 1.2, color="tab:red")
    ax.set_xticks([0, 1], ["baseline", "this run"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel(fig_.unit)
    ax.set_title(f"{fig_.metric} ({fig_.shape.describe()}): {verdict.get('status')}", fontsize=8)
    ax.legend(fontsize=6, loc="best")
    return _png(fig)


def telemetry_png(runs: Sequence[TelemetryRun], title: str) -> str | None:
    """Power and memory (summed over cards) against seconds from each run's start: two
    panels (W, GiB), one line per run; None when no run has a series."""
    drawn = [r for r in runs if r.t_s]
    if not drawn:
        return None
    fig, (power, memory) = _panels(2)
    for r in drawn:
        label = r.labels or r.test
        power.plot(r.t_s, [float("nan") if p is None else p for p in r.power_w], label=label)
        memory.plot(r.t_s, [float("nan") if m is None else m for m in r.memory_gib], label=label)
    for ax, unit, what in ((power, "W", "power"), (memory, "GiB", "memory used")):
        ax.set_title(f"{title}: {what}", fontsize=9)
        ax.set_xlabel("seconds from the run's start")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    _legend_below(power)
    return _png(fig)


# --------------------------------------------------------------------------- issue 24 / 17


def change_points_png(series: Any) -> str:
    """One `servelab.history.Series`: its points in session order, each segment's mean
    between change points (dashed), each change point (red line, its change) and each
    annotated reset (grey dotted line)."""
    fig, (ax,) = _panels(1, 6.0, 3.0)
    xs = list(range(len(series.points)))
    ax.plot(xs, [p.value for p in series.points], marker="o", ms=3, lw=1, label="record value")
    cuts = [0, *(c.index for c in series.change_points), len(xs)]
    for lo, hi in itertools.pairwise(cuts):
        if hi > lo:
            mean = sum(p.value for p in series.points[lo:hi]) / (hi - lo)
            ax.hlines(mean, lo - 0.4, hi - 0.6, colors="tab:green", linestyles="dashed")
    for c in series.change_points:
        ax.axvline(c.index - 0.5, color="tab:red", lw=1.2)
        ax.annotate(
            f"{c.change * 100:+.1f}% ({c.kind})",
            (c.index - 0.5, c.after),
            fontsize=7,
            color="tab:red",
            xytext=(3, 3),
            textcoords="offset points",
        )
    for i, r in series.resets:
        ax.axvline(i - 0.5, color="grey", ls=":", lw=1.2)
        ax.annotate(f"reset: {r.reason[:40]}", (i - 0.5, series.points[i].value), fontsize=6)
    ax.set_title(f"{series.figure}\n{series.profile} on {series.host}", fontsize=8)
    ax.set_xlabel("record (session order)")
    ax.set_ylabel(series.points[0].unit if series.points else "")
    ax.grid(alpha=0.3)
    return _png(fig)


def knee_png(sweep: Any) -> str:
    """A `servelab.report_sweeps.Sweep`: latency against achieved throughput (each point
    labelled with its offered rate, the knee starred), and achieved against offered rate
    beside the line where they are equal."""
    fig, (lat, rate) = _panels(2, 5.5, 3.6)
    pts = sweep.points
    knee = sweep.knee_point()
    achieved = [p.achieved_rps for p in pts]
    names = sorted({k for p in pts for k in p.latency_ms if k.split()[1] in ("e2el", "ttft")})
    for name in names:
        ys = [p.latency_ms.get(name, float("nan")) for p in pts]
        lat.plot(achieved, ys, marker="o", label=name)
        for p, y in zip(pts, ys, strict=True):
            lat.annotate(f"{p.offered_rps:g}/s", (p.achieved_rps, y), fontsize=6)
        if knee is not None and name in knee.latency_ms:
            lat.plot([knee.achieved_rps], [knee.latency_ms[name]], "r*", ms=12)
    if knee is not None:
        lat.axvline(knee.achieved_rps, color="tab:red", ls="--", lw=1, label="knee")
    lat.set_title(f"{sweep.profile}: latency against throughput ({sweep.session})", fontsize=8)
    lat.set_xlabel("achieved requests/s")
    lat.set_ylabel("ms (median of runs)")
    lat.grid(alpha=0.3)
    _legend_below(lat)
    offered = [p.offered_rps for p in pts]
    rate.plot(offered, achieved, marker="o", label="achieved")
    rate.plot(offered, offered, color="grey", ls=":", label="achieved = offered")
    if sweep.knee_rps is not None:
        rate.axvline(sweep.knee_rps, color="tab:red", ls="--", lw=1, label="knee")
    rate.set_title(f"{sweep.profile}: achieved against offered rate", fontsize=8)
    rate.set_xlabel("offered requests/s")
    rate.set_ylabel("achieved requests/s")
    rate.grid(alpha=0.3)
    _legend_below(rate)
    return _png(fig)


def capacity_png(curve: Any) -> str:
    """A `servelab.report_sweeps.CapacityCurve`: each SLO'd percentile at every load the
    searches tried (filled: held, hollow: missed), its bound, and the capacity found."""
    keys = sorted({k for lv in curve.levels for k in lv.values_ms})
    fig, axes = _panels(max(1, len(keys)), 5.0, 3.4)
    for ax, key in zip(axes, keys, strict=False):
        lat = key.split()[1]
        for lv in curve.levels:
            v = lv.values_ms.get(key)
            if v is None:
                continue
            ok = lv.verdicts.get(key) != "missed"
            ax.plot([lv.load_rps], [v], "o", color="tab:blue", mfc="tab:blue" if ok else "none")
        if lat in curve.slos_ms:
            ax.axhline(curve.slos_ms[lat], color="tab:orange", ls="--", label=f"SLO {lat}")
        if curve.capacity_rps is not None:
            ax.axvline(curve.capacity_rps, color="tab:red", lw=1, label="capacity (median)")
        ax.set_title(f"{curve.profile}: {key} against load ({curve.session})", fontsize=8)
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    return _png(fig)
