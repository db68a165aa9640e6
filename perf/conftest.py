"""perf/ wiring: quality first, then speed.

- Once per served target, before any speed test of that target: the profile's patch files
  are checked against the installed engine (an unpatched engine is refused), then the
  quality gate runs (canaries, output identity, fact recall; `servelab.quality`). Under
  pytest-xdist the gate runs once per session: the first worker to need it runs it, the
  others reuse its outcome (`servelab_gates`).
- A failed gate appends its reasons to ``RunState.invalid_reasons`` (no pass verdict, no
  baseline update) and every speed test of that target fails with the reasons. Tests that
  take ``servelab_quality_gate`` as an argument are the gate's own tests and report it.
- Every perf test gets the engine's Prometheus ``/metrics`` scraped before and after; the
  delta goes in ``LabRecords.metrics`` under the test's node id.

Results live in ``config.stash[servelab.quality.LAB_RECORDS_KEY]`` (gates, patches,
metrics, session cache) and, per target, in ``<results>/quality-<target>.json``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from servelab.errors import ServelabError
from servelab.quality import (
    DEFAULT_SEED,
    LAB_RECORDS_KEY,
    GateReport,
    LabRecords,
    QualitySet,
    RecallStyle,
    SharedGates,
    load_quality_file,
    resolve_quality_path,
    run_gate,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("servelab").addoption(
        "--quality-file",
        default=None,
        metavar="TOML",
        help="quality gate file (canaries, recall style) overriding the profile's; "
        "required with --endpoint",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LAB_RECORDS_KEY] = LabRecords()


def _records(config: pytest.Config) -> LabRecords:
    return config.stash[LAB_RECORDS_KEY]


def _quality_set(config: pytest.Config, profile: Any) -> QualitySet | None:
    option = config.getoption("--quality-file")
    if option:
        return load_quality_file(Path(option))
    if profile is None:
        return None
    path = resolve_quality_path(profile.quality.canaries, profile.path)
    if path is None:
        return QualitySet(path=None, seed=DEFAULT_SEED, canaries=(), recall=RecallStyle())
    return load_quality_file(path)


def _check_patches(profile: Any, state: Any, records: LabRecords) -> None:
    """Refuse an engine that lacks the profile's patches (only where its hardware exists:
    elsewhere the endpoint fixture skips with the hardware reason first)."""
    from servelab.hardware import accelerator_available
    from servelab.patches import UnpatchedEngineError, require_patches

    hw = profile.hardware
    if not profile.patches.files or not accelerator_available(hw.accelerator, hw.count)[0]:
        return
    try:
        records.patches[profile.name] = require_patches(
            profile.name,
            profile.patches.files,
            profile_dir=None if profile.path is None else profile.path.parent,
            source_root=profile.patches.source_root,
            module=profile.engine.module,
        )
    except UnpatchedEngineError as exc:
        state.invalid_reasons.append(str(exc))
        pytest.fail(str(exc), pytrace=False)
    except ServelabError as exc:
        pytest.fail(f"profile {profile.name!r}: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def servelab_quality_set(
    pytestconfig: pytest.Config, servelab_target: str, servelab_profile: Any
) -> QualitySet | None:
    """The target's quality file (--quality-file, else the profile's); None for an external
    endpoint without one."""
    try:
        return _quality_set(pytestconfig, servelab_profile)
    except ServelabError as exc:
        pytest.fail(f"[{servelab_target}] {exc}", pytrace=False)


@pytest.fixture(scope="session")
def servelab_quality_gate(
    request: pytest.FixtureRequest,
    pytestconfig: pytest.Config,
    servelab_target: str,
    servelab_profile: Any,
    servelab_state: Any,
    servelab_options: Any,
) -> GateReport:
    """The quality gate of this target, run once, before its first speed test."""
    from servelab import recall

    records = _records(pytestconfig)
    profile = servelab_profile
    if profile is not None:
        _check_patches(profile, servelab_state, records)
    qset = request.getfixturevalue("servelab_quality_set")
    try:
        shape = None if profile is None else profile.workloads.recall
        if profile is not None and shape is not None:
            recall.check_fits_estimate(
                lines=shape.lines,
                max_tokens=shape.max_tokens,
                context_len=profile.model.context_len,
                profile=profile.name,
            )
    except ServelabError as exc:
        pytest.fail(str(exc), pytrace=False)
    endpoint, _identity = request.getfixturevalue("servelab_session_endpoint")
    if qset is None:
        reason = (
            f"quality gate [{servelab_target}]: no quality file for an external endpoint; "
            "pass --quality-file (canaries with exact answers for the served model)"
        )
        servelab_state.invalid_reasons.append(reason)
        pytest.fail(reason, pytrace=False)
    gates: SharedGates = request.getfixturevalue("servelab_gates")  # once, also under xdist
    try:
        report = gates.run(
            servelab_target,
            partial(
                run_gate,
                endpoint,
                servelab_target,
                qset,
                repeats=2 if profile is None else profile.quality.repeats,
                identity_fraction=1.0 if profile is None else profile.quality.identity_fraction,
                recall_lines=None if shape is None else shape.lines,
                recall_depths=("early", "middle", "late") if shape is None else shape.depths,
                recall_max_tokens=4 if shape is None else shape.max_tokens,
                context_len=None if profile is None else profile.model.context_len,
                timeout_s=300.0 if profile is None else profile.limits.request_timeout_s,
            ),
        )
    except ServelabError as exc:
        pytest.fail(str(exc), pytrace=False)
    records.gates[servelab_target] = report
    servelab_state.quality_checks.extend(
        f"[{servelab_target}] {c.name}: {'pass' if c.passed else 'FAIL'} - {c.summary}"
        for c in report.checks
    )
    if not report.passed:
        servelab_state.invalid_reasons.extend(report.reasons())
    _write(servelab_options.results_dir, servelab_target, report, records)
    return report


def _write(results_dir: Path, target: str, report: GateReport, records: LabRecords) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    patches = records.patches.get(target)
    payload = {
        "schema_version": 1,
        "gate": report.to_dict(),
        "patches": None if patches is None else asdict(patches),
    }
    (results_dir / f"quality-{target}.json").write_text(json.dumps(payload, indent=2))


@pytest.fixture(autouse=True)
def _servelab_quality_first(request: pytest.FixtureRequest) -> Iterator[None]:
    """Speed tests refuse to run on a target whose gate failed; /metrics deltas per test."""
    if "servelab_target" not in request.fixturenames:
        yield
        return
    gate: GateReport = request.getfixturevalue("servelab_quality_gate")
    own = "servelab_quality_gate" in inspect.signature(request.function).parameters
    if not gate.passed and not own:
        pytest.fail(
            f"no speed verdict: the quality gate of {gate.target!r} failed: "
            + "; ".join(gate.reasons()),
            pytrace=False,
        )
    from servelab import prometheus
    from servelab.errors import ClientError

    endpoint = request.getfixturevalue("servelab_session_endpoint")[0]
    before: prometheus.Samples | None = None
    missing = ""
    try:
        before = prometheus.scrape(endpoint.base_url, endpoint.headers)
    except ClientError as exc:
        missing = str(exc)
    yield
    records = _records(request.config)
    if before is None:
        records.metrics[request.node.nodeid] = f"not recorded: {missing}"
        return
    try:
        after = prometheus.scrape(endpoint.base_url, endpoint.headers)
        records.metrics[request.node.nodeid] = prometheus.delta(before, after)
    except ClientError as exc:
        records.metrics[request.node.nodeid] = f"not recorded: {exc}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    records = terminalreporter.config.stash.get(LAB_RECORDS_KEY, None)
    if records is None or not (records.gates or records.patches):
        return
    tr = terminalreporter
    tr.section("servelab quality gates")
    for name, patches in records.patches.items():
        for p in patches.patches:
            tr.write_line(f"[{name}] patch {p.name}: {p.state} (sha256 {p.sha256[:16]})")
    for target, gate in records.gates.items():
        verdict = "PASS" if gate.passed else "FAIL: speed results of this target are invalid"
        tr.write_line(f"[{target}] quality gate {verdict}")
        for c in gate.checks:
            tr.write_line(f"  {c.name}: {'ok' if c.passed else 'FAILED'} - {c.summary}")
            for p in c.problems[:5]:
                tr.write_line(f"    {p}")
