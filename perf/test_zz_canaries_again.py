"""The quality gate's canaries asked again at the end of the session (issue 24, item 3).

The gate asks each canary before any speed test (servelab.plugin_gate); this module asks
each one once more, greedy with the same seed, one at a time, after the perf tests, and
compares every answer with the gate's first sequential answer, byte for byte
(`servelab.quality.recheck_canaries`). A changed or wrong answer is a failed audit: the check
joins the record's quality gates as "<target> (end of session)", the session's speed
results are marked invalid (no baseline update) with the reason, and this test fails.

Named `test_zz_...` so that pytest, which collects a folder's modules in name order, runs
it after every other perf module, once per target (it is parametrized by target like every
perf test). Under pytest-xdist the order across workers is not guaranteed: it runs among the
last tests, perhaps beside another one; the comparison does not depend on timing.
"""

from __future__ import annotations

import pytest

from servelab.gate_report import GateReport
from servelab.plugin_measure import Measurement
from servelab.quality import GateLimits, QualitySet, end_gate_key, recheck_canaries
from servelab.session import SessionResults

pytestmark = pytest.mark.perf


def test_canaries_again_at_the_end(
    servelab_measure: Measurement,
    servelab_quality_gate: GateReport,  # the opening gate (taking it: this test reads it)
    servelab_quality_set: QualitySet | None,
    servelab_state: SessionResults,
) -> None:
    m = servelab_measure
    start = servelab_quality_gate
    if not start.passed:
        pytest.skip(f"{m.name}: the opening quality gate failed; nothing to compare with")
    qset = servelab_quality_set
    if qset is None or not qset.canaries:
        pytest.skip(f"{m.name}: no canaries configured")
    s = m.settings
    limits = GateLimits.starting_now(s.timeout_s, s.first_token_timeout_s, None)
    check = recheck_canaries(m.endpoint, qset, start, limits=limits)
    key = end_gate_key(start.target)
    report = GateReport(key, start.quality_file, start.quality_file_sha256, qset.seed, (check,))
    servelab_state.gates[key] = report
    m.progress(f"{check.name}: {'ok' if check.passed else 'FAILED'} - {check.summary}")
    if not check.passed:
        servelab_state.invalidate(report.reasons())
        pytest.fail(
            f"{key}: canaries changed after the perf tests:\n" + "\n".join(check.problems),
            pytrace=False,
        )
