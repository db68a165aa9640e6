"""Multi-turn sessions (issue 17 item 5): `sessions` conversations side by side, each of
`turns` turns whose prompt is the whole history (every earlier prompt and answer) plus a new
user message, with a think delay between an answer and the next turn
(`servelab.conversations`).

Figures by turn index: median TTFT (`mt_ttft_ms_turn{t}`) and the share of the prompt the
server reports served from its prefix cache (`mt_cached_share_turn{t}`); with the profile's
``control`` on, the same conversations with a fresh salt heading every prompt, nothing to
reuse (`mt_ttft_ms_turn{t}_control`), measured in the same session, the arms' order
alternating run by run. Per session: its duration and the run's output throughput.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from servelab import conversations, metrics
from servelab.figures import Shape
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.profiles import MultiTurnShape

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = MultiTurnShape(
    sessions=2, turns=3, first_tokens=136, user_tokens=24, output_tokens=8, think_s=0.2
)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ttft_ms(r: Any) -> float | None:
    v = metrics.ttft_s(r)
    return None if v is None else v * 1000


def _cached_share(r: Any) -> float | None:
    if r.cached_tokens is None or not r.prompt_tokens:
        return None
    return float(r.cached_tokens) / float(r.prompt_tokens)


def _session_s(plan: conversations.Plan, run: RunResult) -> list[float]:
    out = []
    for s in range(plan.sessions):
        mine = [r for r in run.records if r.index // plan.turns == s]
        if len(mine) == plan.turns and all(r.end_ns for r in mine):
            out.append((max(r.end_ns or 0 for r in mine) - min(r.send_ns for r in mine)) / 1e9)
    return out


def test_multiturn(servelab_measure: Measurement) -> None:
    m = servelab_measure
    shape = m.shape("multiturn", EXTERNAL_SHAPE)
    runs = m.runs(shape.runs)
    arms = (True, False) if shape.control else (True,)

    def plan(reuse: bool) -> conversations.Plan:
        return conversations.Plan(
            sessions=shape.sessions,
            turns=shape.turns,
            first_tokens=shape.first_tokens,
            user_tokens=shape.user_tokens,
            output_tokens=shape.output_tokens,
            think_s=shape.think_s,
            reuse=reuse,
        )

    measured: list[tuple[dict[str, Any], RunResult]] = []
    for i in range(runs):
        for reuse in arms if i % 2 == 0 else arms[::-1]:
            arm = "reuse" if reuse else "control"
            m.progress(f"run {i + 1}/{runs}, {arm}: {plan(reuse).describe()}")
            res = conversations.measure(
                m.endpoint,
                plan=plan(reuse),
                tag=f"mt{i}{arm}",
                warmup_requests=1 if not measured else 0,
                settings=m.settings,
            )
            measured.append(({"run": i, "arm": arm}, res))
    kept = m.keep(measured, may_drop=True)
    by_arm: dict[str, list[RunResult]] = {}
    for labels, res in kept:
        by_arm.setdefault(labels["arm"], []).append(res)

    reuse_plan = plan(True)
    notes = (
        reuse_plan.describe(),
        f"{len(by_arm.get('reuse', []))} of {runs} runs kept"
        + (", each beside a control run, arms' order alternating" if shape.control else ""),
    )
    per_turn = shape.user_tokens + shape.output_tokens
    for t in range(1, shape.turns + 1):
        # Turn t's prompt: the opening, (t - 1) earlier answers and t - 1 new messages (the
        # transcript's cue words aside; each row has usage.prompt_tokens); its context is
        # what came before the newest message.
        history = shape.first_tokens + (t - 1) * per_turn - shape.user_tokens if t > 1 else None
        fig_shape = Shape(
            shape.first_tokens + (t - 1) * per_turn,
            shape.output_tokens,
            concurrency=shape.sessions,
            context_tokens=history,
        )

        def by_turn(arm: str, read: Any, t: int = t) -> list[float | None]:
            return [
                _median(conversations.turn_values(reuse_plan, res, read)[t - 1])
                for res in by_arm.get(arm, [])
            ]

        m.record("mt_ttft_ms_turn{t}", by_turn("reuse", _ttft_ms), fig_shape, notes=notes, t=t)
        if t > 1:  # turn 1 has no history: nothing to serve from the cache
            m.record(
                "mt_cached_share_turn{t}",
                by_turn("reuse", _cached_share),
                fig_shape,
                notes=notes,
                t=t,
            )
        if shape.control:
            m.record(
                "mt_ttft_ms_turn{t}_control",
                by_turn("control", _ttft_ms),
                fig_shape,
                notes=(*notes, "control arm: a fresh salt heads every turn's prompt"),
                t=t,
            )
    whole = Shape(shape.first_tokens, shape.output_tokens, concurrency=shape.sessions)
    reuse_runs = by_arm.get("reuse", [])
    m.record(
        "mt_session_s",
        [_median(_session_s(reuse_plan, res)) for res in reuse_runs],
        whole,
        notes=notes,
    )
    out = m.record(
        "mt_output_throughput",
        [metrics.compute(r.records, r.start_ns, r.end_ns).output_throughput for r in reuse_runs],
        whole,
        notes=notes,
    )
    hits = [res.server_cache_hits for res in reuse_runs]
    m.progress(f"server prefix-cache hit tokens per reuse run: {hits}")
    for res in reuse_runs:
        assert conversations.turns_not_sent(reuse_plan, res) == 0
        assert all(r.success for r in res.records)
    assert out.value is not None and out.value > 0
