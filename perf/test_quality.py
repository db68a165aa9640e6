"""The quality gate of each served target, reported test by test.

The gate itself runs once per target (servelab.plugin_gate), before any speed test; these
tests only read its report, so a failure shows up here by name as well as blocking the
speed tests.
"""

from __future__ import annotations

import pytest

from servelab.gate_report import GateReport

pytestmark = pytest.mark.perf


def _check(gate: GateReport, name: str) -> None:
    check = next(c for c in gate.checks if c.name == name)
    detail = "\n".join(check.problems) or check.summary
    assert check.passed, f"{name} failed on {gate.target}: {detail}"
    print(f"{gate.target} {name}: {check.summary}")


def test_canaries_answer_exactly(servelab_quality_gate: GateReport) -> None:
    _check(servelab_quality_gate, "canaries")


def test_greedy_output_identity(servelab_quality_gate: GateReport) -> None:
    _check(servelab_quality_gate, "identity")


def test_fact_recall_at_depth(servelab_quality_gate: GateReport) -> None:
    _check(servelab_quality_gate, "recall")
