"""Bisect an ordered list of builds for the first one whose metric regressed.

Builds (engine commits, patch sets, argument sets) are ordered oldest first; the first is
the reference. Each step is an interleaved A/B comparison (`servelab.ab`) of the reference
(A) against the build halfway between the last build known unchanged and the first known
regressed (B): "regression" moves the upper end down, "no change" or "improvement" moves
the lower end up. An "inconclusive" step stops the search and says at which build (more
budget or a quieter host, then resume from there). The last build is compared first: no
regression there, nothing to bisect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from servelab.ab import ABResult, Measure, run_ab
from servelab.errors import ServelabError
from servelab.figures import Direction
from servelab.sequential import Plan

T = TypeVar("T")


class BisectError(ServelabError, ValueError):
    """A bisect that cannot start (fewer than two builds)."""


@dataclass(frozen=True)
class Build:
    """A build in a bisect's list: its place (0 the reference) and what it is, shown as its
    label (builds may repeat: two stand-ins of the same delay are still two builds)."""

    index: int
    label: str = field(compare=False)

    def __repr__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Step(Generic[T]):
    build: T
    index: int
    result: ABResult


@dataclass(frozen=True)
class BisectResult(Generic[T]):
    """`first_bad`: the index of the first regressed build (None: none found, or stopped);
    `steps` in the order run; `stopped`: why it ended without an answer ("" otherwise)."""

    builds: tuple[T, ...]
    first_bad: int | None
    last_good: int
    steps: tuple[Step[T], ...]
    stopped: str = ""

    @property
    def runs(self) -> int:
        return sum(s.result.verdict.runs for s in self.steps)

    @property
    def answered(self) -> bool:
        """Whether the search ended with an answer: the first regressed build, or none
        (the last build decided unchanged or improved); not when a step was undecided."""
        if self.first_bad is not None:
            return True
        return bool(self.steps) and self.steps[-1].result.verdict.outcome in (
            "no change",
            "improvement",
        )

    def to_dict(self) -> dict[str, Any]:
        """For the record: the builds by label, the answer and every step's A/B."""
        return {
            "builds": [repr(b) for b in self.builds],
            "first_bad": self.first_bad,
            "first_bad_build": None
            if self.first_bad is None
            else repr(self.builds[self.first_bad]),
            "last_good": self.last_good,
            "answered": self.answered,
            "stopped": self.stopped,
            "runs": self.runs,
            "summary": self.describe(),
            "steps": [
                {"index": st.index, "build": repr(st.build), **asdict(st.result)}
                for st in self.steps
            ],
        }

    def describe(self) -> str:
        tail = f" ({len(self.steps)} A/B comparisons, {self.runs} runs)"
        if self.first_bad is not None:
            return (
                f"first regressed build: #{self.first_bad} {self.builds[self.first_bad]!r} "
                f"(last unchanged: #{self.last_good} {self.builds[self.last_good]!r}){tail}"
            )
        return f"no regressed build found: {self.stopped}{tail}"


def bisect_builds(
    builds: Sequence[T],
    measure_of: Callable[[T], Measure],
    plan: Plan,
    direction: Direction,
    rng: np.random.Generator,
    *,
    on_step: Callable[[Step[T]], None] | None = None,
) -> BisectResult[T]:
    """Find the first build of `builds` (oldest first, the first the reference) whose
    metric regressed against the reference; `measure_of(build)` measures one run of it."""
    items = tuple(builds)
    if len(items) < 2:
        raise BisectError(
            f"bisect needs a reference and at least one later build, got {len(items)}: "
            "name at least one build after the reference"
        )
    reference = measure_of(items[0])
    steps: list[Step[T]] = []

    def compare(i: int) -> str:
        res = run_ab(reference, measure_of(items[i]), plan, direction, rng)
        step = Step(items[i], i, res)
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return res.verdict.outcome

    good, bad = 0, len(items) - 1
    last = compare(bad)
    if last != "regression":
        why = f"the last build #{bad} against the reference: {last}"
        return BisectResult(items, None, good, tuple(steps), why)
    while bad - good > 1:
        mid = (good + bad) // 2
        outcome = compare(mid)
        if outcome == "regression":
            bad = mid
        elif outcome in ("no change", "improvement"):
            good = mid
        else:
            why = (
                f"build #{mid} {items[mid]!r} is undecided ({outcome}): the regression lies "
                f"in #{good + 1}..#{bad}; raise the A/B budget or quiet the host and resume"
            )
            return BisectResult(items, None, good, tuple(steps), why)
    return BisectResult(items, bad, good, tuple(steps))
