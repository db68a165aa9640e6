"""The plugin's quality-first wiring: quality before speed, and /metrics around every test.

- Once per served target, before any speed test of that target: the profile's patch files
  are checked against the installed engine (an unpatched engine is refused), then the
  quality gate runs (canaries, output identity, fact recall; `servelab.quality`). Under
  pytest-xdist the gate runs once per session: the first worker to need it runs it, the
  others reuse its report (`servelab.xdist.SessionGates`).
- A failed gate marks the session's speed results invalid (no pass verdict, no baseline
  update), every speed test of that target fails with the reasons, and the session's record
  says why. Tests that take ``servelab_quality_gate`` are the gate's own tests.
- Every perf test gets the engine's Prometheus ``/metrics`` scraped before and after; the
  delta joins the session's results under the test's node id.

Registered by `servelab.plugin`, which imports these fixtures.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest

from servelab.errors import ServelabError
from servelab.gate_report import GateReport
from servelab.plugin_options import Options
from servelab.profiles import Profile
from servelab.session import SessionResults
from servelab.xdist import SessionGates, shared_folder

if TYPE_CHECKING:
    from servelab.quality import QualitySet
    from servelab.server import Endpoint


def _quality_set(options: Options, profile: Profile | None) -> QualitySet | None:
    from servelab.quality import (
        DEFAULT_SEED,
        QualitySet,
        RecallStyle,
        load_quality_file,
        resolve_quality_path,
    )

    if options.quality_file is not None:
        return load_quality_file(options.quality_file)
    if profile is None:
        return None
    path = resolve_quality_path(profile.quality.canaries, profile.path)
    if path is None:
        return QualitySet(path=None, seed=DEFAULT_SEED, canaries=(), recall=RecallStyle())
    return load_quality_file(path)


def _check_patches(profile: Profile, results: SessionResults) -> None:
    """Refuse an engine that lacks the profile's patches (only where its hardware exists:
    elsewhere the endpoint fixture skips with the hardware reason first)."""
    from servelab.hardware import accelerator_available
    from servelab.patches import UnpatchedEngineError, require_patches

    hw = profile.hardware
    if not profile.patches.files or not accelerator_available(hw.accelerator, hw.count)[0]:
        return
    try:
        results.patches[profile.name] = require_patches(
            profile.name,
            profile.patches.files,
            profile_dir=None if profile.path is None else profile.path.parent,
            source_root=profile.patches.source_root,
            module=profile.engine.module or "vllm",
        )
    except UnpatchedEngineError as exc:
        results.invalidate([str(exc)])
        pytest.fail(str(exc), pytrace=False)
    except ServelabError as exc:
        pytest.fail(f"profile {profile.name!r}: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def servelab_gates(pytestconfig: pytest.Config) -> SessionGates:
    """Runs each target's quality gate once per session, shared by all xdist workers:
    ``servelab_gates.run(target, gate)`` returns the report of the one run."""
    return SessionGates(shared_folder(pytestconfig))


@pytest.fixture(scope="session")
def servelab_quality_set(
    servelab_options: Options, servelab_target: str, servelab_profile: Profile | None
) -> QualitySet | None:
    """The target's quality file (--quality-file, else the profile's); None for an external
    endpoint without one."""
    try:
        return _quality_set(servelab_options, servelab_profile)
    except ServelabError as exc:
        pytest.fail(f"[{servelab_target}] {exc}", pytrace=False)


@pytest.fixture(scope="session")
def servelab_quality_gate(
    request: pytest.FixtureRequest,
    servelab_target: str,
    servelab_profile: Profile | None,
    servelab_state: SessionResults,
    servelab_options: Options,
) -> GateReport:
    """The quality gate of this target, run once, before its first speed test."""
    if servelab_profile is not None:
        _check_patches(servelab_profile, servelab_state)
    qset = request.getfixturevalue("servelab_quality_set")
    endpoint, _identity = request.getfixturevalue("servelab_session_endpoint")
    return gate_target(request, servelab_target, servelab_profile, endpoint, qset)


def gate_side_target(request: pytest.FixtureRequest, profile: Profile, endpoint: Endpoint) -> None:
    """Patch check and quality gate of a second target of the session (side B of an A/B,
    a build of a bisect: `servelab.plugin_fixtures.side_target`), exactly as the selected
    target's: once per session, its report kept and written; a failed gate marks the session
    invalid and fails the calling test, as it would fail every speed test of that target."""
    results: SessionResults = request.getfixturevalue("servelab_state")
    options: Options = request.getfixturevalue("servelab_options")
    _check_patches(profile, results)
    try:
        qset = _quality_set(options, profile)
    except ServelabError as exc:
        pytest.fail(f"[{profile.name}] {exc}", pytrace=False)
    report = gate_target(request, profile.name, profile, endpoint, qset)
    if not report.passed:
        pytest.fail(
            f"no speed verdict: the quality gate of {profile.name!r} failed: "
            + "; ".join(report.reasons()),
            pytrace=False,
        )


def gate_target(
    request: pytest.FixtureRequest,
    target: str,
    profile: Profile | None,
    endpoint: Endpoint,
    qset: QualitySet | None,
) -> GateReport:
    """Run `target`'s quality gate once per session (shared by xdist workers), keep its
    report in the session's results and write it; a failed gate invalidates the session."""
    from servelab import recall
    from servelab.quality import run_gate

    results: SessionResults = request.getfixturevalue("servelab_state")
    o: Options = request.getfixturevalue("servelab_options")
    shape = None if profile is None else profile.workloads.recall
    try:
        if profile is not None and shape is not None:
            recall.check_fits_estimate(
                lines=shape.lines,
                max_tokens=shape.max_tokens,
                context_len=profile.model.context_len,
                profile=profile.name,
            )
    except ServelabError as exc:
        pytest.fail(str(exc), pytrace=False)
    if qset is None:
        reason = (
            f"quality gate [{target}]: no quality file for an external endpoint; "
            "pass --quality-file (canaries with exact answers for the served model)"
        )
        results.invalidate([reason])
        pytest.fail(reason, pytrace=False)
    from servelab.workloads import request_timeouts

    limits = None if profile is None else profile.limits
    timeout_s, first_token_s = request_timeouts(limits, request_timeout_s=o.request_timeout_s)
    if profile is None and o.request_timeout_s is None:
        timeout_s = 300.0
    deadline_s = o.gate_timeout_s
    if deadline_s is None and limits is not None:
        deadline_s = limits.gate_timeout_s
    gates: SessionGates = request.getfixturevalue("servelab_gates")  # once, also under xdist
    try:
        report = gates.run(
            target,
            partial(
                run_gate,
                endpoint,
                target,
                qset,
                repeats=2 if profile is None else profile.quality.repeats,
                identity_fraction=1.0 if profile is None else profile.quality.identity_fraction,
                recall_lines=None if shape is None else shape.lines,
                recall_depths=("early", "middle", "late") if shape is None else shape.depths,
                recall_max_tokens=4 if shape is None else shape.max_tokens,
                context_len=None if profile is None else profile.model.context_len,
                timeout_s=timeout_s,
                first_token_timeout_s=first_token_s,
                deadline_s=deadline_s,
            ),
        )
    except ServelabError as exc:
        results.invalidate([f"quality gate [{target}] could not run: {exc}"])
        pytest.fail(str(exc), pytrace=False)
    results.gates[target] = report
    if not report.passed:
        results.invalidate(report.reasons())
    _write(o, target, report, results)
    return report


def _write(options: Options, target: str, report: GateReport, results: SessionResults) -> None:
    from servelab.files import atomic_write_text

    options.results_dir.mkdir(parents=True, exist_ok=True)
    patches = results.patches.get(target)
    payload = {
        "schema_version": 1,
        "gate": report.to_dict(),
        "patches": None if patches is None else asdict(patches),
    }
    atomic_write_text(options.results_dir / f"quality-{target}.json", json.dumps(payload, indent=2))


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

    results: SessionResults = request.getfixturevalue("servelab_state")
    endpoint = request.getfixturevalue("servelab_session_endpoint")[0]
    before: prometheus.Samples | None = None
    missing = ""
    try:
        before = prometheus.scrape(endpoint.base_url, endpoint.headers)
    except ClientError as exc:
        missing = str(exc)
    yield
    node = request.node.nodeid
    if before is None:
        results.metrics[node] = f"not recorded: {missing}"
        return
    try:
        after = prometheus.scrape(endpoint.base_url, endpoint.headers)
    except ClientError as exc:
        results.metrics[node] = f"not recorded: {exc}"
        return
    results.metrics[node] = _metrics_data(prometheus.delta(before, after))


def _metrics_data(delta: Any) -> dict[str, Any]:
    return {**asdict(delta), "summary": delta.describe()}
