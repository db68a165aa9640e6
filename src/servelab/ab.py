"""Interleaved A/B in one session: two sides measured alternately, judged sequentially.

A slow drift of a shared machine (another job, CPU frequency, a warming cache) moves every
run measured near the same time alike; measuring A and B in randomized ABBA / BAAB blocks
makes each block's log ratio (mean log B - mean log A) cancel a linear drift within the
block, and the verdict on those ratios (`servelab.sequential`) stops as soon as it is
decided, or at the run budget. Works without pytest: the sides are two "measure one run"
callables (`perf/test_ab.py` wires them to two servers, or to one server and a delaying
proxy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from servelab.errors import ServelabError
from servelab.figures import Direction
from servelab.sequential import RUNS_PER_UNIT, Plan, SequentialVerdict, decide, log_ratios

#: One measured run of a side: given the run's index on that side, its value (> 0).
Measure = Callable[[int], float]
DESIGN = "interleaved A/B (randomized ABBA blocks), sequential"


class ABError(ServelabError):
    """A run of an A/B comparison gave no usable value."""


@dataclass(frozen=True)
class ABResult:
    """Both sides' runs in measurement order, the block orders, and the verdict."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    orders: tuple[str, ...]  # "ABBA" or "BAAB" per block
    verdict: SequentialVerdict
    seconds: float
    stopped_by: str  # "decided", "budget" or "deadline"

    def describe(self) -> str:
        return (
            f"{self.verdict.describe(DESIGN)}; {len(self.orders)} blocks in "
            f"{self.seconds:.0f} s, stopped: {self.stopped_by}"
        )


def run_ab(
    measure_a: Measure,
    measure_b: Measure,
    plan: Plan,
    direction: Direction,
    rng: np.random.Generator,
    *,
    deadline_s: float | None = None,
    on_block: Callable[[int, SequentialVerdict], None] | None = None,
) -> ABResult:
    """Measure A and B in randomized ABBA / BAAB blocks until the sequential verdict is
    decided or the plan's budget is spent.

    `deadline_s` (seconds from the call) ends it early: the verdict is then read at the last
    complete block as a final look (its repeated confidence interval stays valid: stopping
    early only leaves alpha unspent) and is "inconclusive" unless decided there.
    `on_block(blocks, verdict)` is told after every block (progress lines).
    """
    t0 = time.perf_counter_ns()
    a: list[float] = []
    b: list[float] = []
    orders: list[str] = []
    verdict = decide(plan, [], direction)
    stopped_by = "budget"

    def take(side: str, measure: Measure, runs: list[float]) -> None:
        value = float(measure(len(runs)))
        if not (math.isfinite(value) and value > 0):
            raise ABError(
                f"A/B run {len(runs)} of side {side} gave {value!r}: every run must give a "
                f"positive finite value (check the side's server log and the run's requests)"
            )
        runs.append(value)

    for block in range(plan.design.max_units):
        order = "ABBA" if rng.integers(0, 2) == 0 else "BAAB"
        for side in order:
            if side == "A":
                take("A", measure_a, a)
            else:
                take("B", measure_b, b)
        orders.append(order)
        verdict = decide(plan, log_ratios(a, b), direction)
        if on_block is not None:
            on_block(block + 1, verdict)
        if verdict.decided:
            stopped_by = "decided" if verdict.outcome != "inconclusive" else "budget"
            break
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        if deadline_s is not None and elapsed * (block + 2) / (block + 1) > deadline_s:
            # The next block would end past the deadline: read this one as the last look.
            verdict = decide(plan, log_ratios(a, b), direction, final=True)
            stopped_by = "deadline"
            break
    seconds = (time.perf_counter_ns() - t0) / 1e9
    return ABResult(tuple(a), tuple(b), tuple(orders), verdict, seconds, stopped_by)


__all__ = ["DESIGN", "RUNS_PER_UNIT", "ABError", "ABResult", "Measure", "run_ab"]
