"""The servelab pytest plugin: options, markers, hooks and the terminal summary.

The fixtures live in `servelab.plugin_fixtures` (targets, endpoints, measurement) and
`servelab.plugin_gate` (patch check, quality gate, /metrics per test); this module imports
them so one entry point registers everything. The logic lives in plain modules (profiles,
pool, target, judging, session, finish) so the command line reuses it without pytest.

One session's results live in one `SessionResults` (`servelab.session`), in `config.stash`.
Under pytest-xdist each worker saves its results after every test and the controller merges
them at session end (`servelab.xdist`), writes the session's one record and prints the same
summary as a run without xdist.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import pytest

from servelab.errors import ServelabError
from servelab.judging import Judge
from servelab.plugin_fixtures import (
    servelab_endpoint,
    servelab_identity,
    servelab_options,
    servelab_pool,
    servelab_profile,
    servelab_record,
    servelab_session_endpoint,
    servelab_state,
    servelab_target,
    servelab_target_info,
)
from servelab.plugin_gate import (
    _servelab_quality_first,
    servelab_gates,
    servelab_quality_gate,
    servelab_quality_set,
)
from servelab.plugin_measure import servelab_measure
from servelab.plugin_options import (
    DEFAULT_PROFILE,
    EXTERNAL,
    Options,
    add_options,
    parse_options,
)
from servelab.session import SessionInfo, SessionResults
from servelab.xdist import (
    collect_session,
    save_worker_part,
    start_controller,
    stop_controller,
    stop_shared_engines,
)

__all__ = [
    "DEFAULT_PROFILE",
    "EXTERNAL",
    "Options",
    "_servelab_quality_first",
    "servelab_endpoint",
    "servelab_gates",
    "servelab_identity",
    "servelab_measure",
    "servelab_options",
    "servelab_pool",
    "servelab_profile",
    "servelab_quality_gate",
    "servelab_quality_set",
    "servelab_record",
    "servelab_session_endpoint",
    "servelab_state",
    "servelab_target",
    "servelab_target_info",
]


@dataclass
class SessionRun:
    """The plugin's state for one pytest process: its options, its results, what the end of
    the session said."""

    options: Options
    results: SessionResults = field(default_factory=SessionResults)
    started_at: float = field(default_factory=time.time)
    messages: list[str] = field(default_factory=list)
    update_refused: bool = False
    judge: Judge | None = None  # made on the first figure (reads baselines lazily)


RUN_KEY = pytest.StashKey[SessionRun]()

MARKERS = (
    "perf: measures a real serving engine (starts one per selected profile)",
    "kernels: attention/TurboQuant kernels against float64 references",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> None:
    """pytest finds its rootdir and ini file before installed plugins add their options, so
    `--profiles-dir DIR` (space form, as users type it) first reads DIR as a test path: a DIR
    outside the project moves the rootdir and drops pyproject.toml. Now that the option is
    known, find them again and apply the ini's addopts that were missed."""
    from servelab.plugin_options import find_setup_again

    find_setup_again(early_config, args)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    config.stash[RUN_KEY] = SessionRun(parse_options(config))
    start_controller(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_controller(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "servelab_target" not in metafunc.fixturenames:
        return
    options = metafunc.config.stash[RUN_KEY].options
    targets = [EXTERNAL] if options.endpoint else [p.name for p in options.profiles]
    metafunc.parametrize("servelab_target", targets, indirect=True, scope="session", ids=targets)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    # After every test (fixture teardowns included): a worker that dies later keeps this.
    try:
        return (yield)
    finally:
        run = item.config.stash.get(RUN_KEY, None)
        if run is not None:
            save_worker_part(item.config, run.results)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """A perf test stopped by servelab itself (a stuck server, a passed deadline, an engine
    that went away) fails with the reason alone, and the session's record keeps it."""
    try:
        return (yield)
    except ServelabError as exc:
        run = item.config.stash.get(RUN_KEY, None)
        if run is None or "servelab_target" not in getattr(item, "fixturenames", ()):
            raise
        run.results.invalidate([f"{item.nodeid}: {exc}"])
        pytest.fail(str(exc), pytrace=False)


# ---------------------------------------------------------------------------- summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from servelab.report import terminal_table

    run = terminalreporter.config.stash.get(RUN_KEY, None)
    if run is None:
        return
    tr = terminalreporter
    res = run.results
    if res.gates or res.patches:
        tr.section("servelab quality gates")
        for name, patches in res.patches.items():
            for patch in patches.patches:
                tr.write_line(
                    f"[{name}] patch {patch.name}: {patch.state} (sha256 {patch.sha256[:16]})"
                )
        for gated, gate in res.gates.items():
            verdict = "PASS" if gate.passed else "FAIL: speed results of this target are invalid"
            tr.write_line(f"[{gated}] quality gate {verdict}")
            for c in gate.checks:
                tr.write_line(f"  {c.name}: {'ok' if c.passed else 'FAILED'} - {c.summary}")
                for p in c.problems[:5]:
                    tr.write_line(f"    {p}")
    if res.verdicts:
        tr.section("servelab figures")
        for target_name, target in res.targets.items():
            if target.startup_seconds is not None:
                tr.write_line(
                    f"server start [{target_name}]: {target.startup_seconds:.1f} s "
                    "(cold process start to ready)"
                )
        for v in res.verdicts:
            tr.write_line(v.figure.label())
        tr.section("servelab verdicts")
        for line in terminal_table(res.verdicts):
            tr.write_line(line)
        missing = sum(v.status == "no baseline" for v in res.verdicts)
        if missing and not run.options.update_baselines:
            tr.write_line(
                f"{missing} figure(s) have no baseline: create them with "
                "`pytest -m perf --update-baselines`"
            )
    for line in run.messages:
        tr.write_line(line)


# ---------------------------------------------------------------------------- the end


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the session's record (also after Ctrl-C, SIGTERM or a failed gate) and run the
    baseline update workflow; a refused update fails the session.

    Last (trylast): after pytest's own end-of-session teardown, which is where the session
    fixtures of an interrupted session are torn down; the engines are stopped and their
    stops and post-run receipts (issue 25) are in the results before the record is written.
    Under xdist a worker only saves its part; the controller merges the parts, stops the
    engines the workers shared (`stop_shared_engines`) and writes the one record."""
    from servelab.baselines import servelab_commit, who
    from servelab.finish import finish, session_redactor
    from servelab.hardware import collect_host
    from servelab.plugin_fixtures import _receipt_args, served_profiles

    config = session.config
    run = config.stash.get(RUN_KEY, None)
    if run is None or save_worker_part(config, run.results):
        return
    run.results = collect_session(config, run.results, run.messages)
    res = run.results
    stop_shared_engines(
        config, res, run.options.profiles, run.messages, **_receipt_args(run.options)
    )
    if not res.has_data() and not run.options.update_baselines:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", {})
    failed = tuple(getattr(r, "nodeid", "?") for k in ("failed", "error") for r in stats.get(k, []))
    if session.testsfailed and not failed:
        failed = (f"{session.testsfailed} test(s)",)
    info = SessionInfo(
        started_at=run.started_at,
        finished_at=time.time(),
        command=shlex.join(["pytest", *config.invocation_params.args]),
        exit_status=int(exitstatus),
        interrupted=int(exitstatus) == int(pytest.ExitCode.INTERRUPTED),
        servelab_commit=servelab_commit(),
        by=who(),
        invalid_reasons=tuple(res.invalid_reasons),
        quality_checks=tuple(res.quality_checks),
        failed_tests=failed,
    )
    options = run.options
    logs_dir = options.results_dir / "logs"
    logs = [p for p in sorted(logs_dir.glob("*.log")) if p.stat().st_mtime >= run.started_at]
    names = sorted(res.targets) or ["session"]
    label = "-".join(names)
    try:
        outcome = finish(
            res,
            info,
            host=collect_host(),
            results_dir=options.results_dir,
            baselines_dir=options.baselines_dir,
            redactor=session_redactor(  # A/B side profiles' engine secrets too
                options.api_key, [p.engine.env for p in served_profiles(options)]
            ),
            update=options.update_baselines,
            logs=logs,
            label=label,
            profiles=options.profiles,  # card scaling is judged there (servelab.cards)
        )
    except (ServelabError, OSError) as exc:
        run.messages.append(f"servelab: could not write the record: {exc}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    run.messages += outcome.lines
    if outcome.regressions and not options.update_baselines:
        # A session-level figure (card scaling) has no test to fail: the session fails.
        run.messages += [f"servelab: session figure failed: {r}" for r in outcome.regressions]
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # Issue 18 (step summary, added by the formats task): the verdict table in GitHub's job page.
    from servelab.step_summary import ENV, append

    try:
        summary = append(res.verdicts)
    except OSError as exc:
        run.messages.append(f"servelab: could not append the verdict table to ${ENV}: {exc}")
    else:
        if summary is not None:
            run.messages.append(f"servelab: verdict table appended to {summary} (${ENV})")
    if outcome.update_refused:
        run.update_refused = True
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
