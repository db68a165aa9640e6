"""The servelab pytest plugin: options, markers, fixtures and the terminal summary only.

The logic lives in plain modules (profiles, pool, server, figures) so the command line can
reuse it without pytest.

Under pytest-xdist the controller makes a shared folder and hands it to the workers; they
share each target's server and quality gate through it and save what they measured there
after every test; the controller merges those parts at session end, writes the session's one
record and prints the same summary as a run without xdist (`servelab.xdist`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from servelab.errors import ServelabError
from servelab.figures import Figure, Identity
from servelab.profiles import Profile, available_profiles, default_profile_dirs, load_named
from servelab.server import Endpoint
from servelab.xdist import (
    SessionGates,
    gather_workers,
    save_worker_part,
    shared_folder,
    start_controller,
    stop_controller,
)

if TYPE_CHECKING:
    from servelab.quality import SharedGates

EXTERNAL = "endpoint"
DEFAULT_PROFILE = "cpu-smollm2"


@dataclass(frozen=True)
class Options:
    profiles: tuple[Profile, ...]
    endpoint: str | None
    model: str | None
    api_key: str | None
    results_dir: Path
    baselines_dir: Path
    update_baselines: bool
    runs: int | None
    startup_timeout_s: float | None


@dataclass
class RunState:
    """Everything one pytest session measured; filled by fixtures, read at session end."""

    options: Options
    started_at: float = field(default_factory=time.time)
    figures: list[Figure] = field(default_factory=list)
    startup: dict[str, float | None] = field(default_factory=dict)
    invalid_reasons: list[str] = field(default_factory=list)
    # Raw per-request rows (servelab.records.request_row of a client RequestRecord + labels).
    requests: list[dict[str, object]] = field(default_factory=list)
    # Quality gates that ran and passed, in words ("canaries 12/12 exact"); the record says
    # "not checked" when empty.
    quality_checks: list[str] = field(default_factory=list)
    perf: object | None = None  # servelab.records.PerfSession, created on first figure
    messages: list[str] = field(default_factory=list)  # from session end, for the summary


OPTIONS_KEY = pytest.StashKey[Options]()
STATE_KEY = pytest.StashKey[RunState]()
POOL_KEY = pytest.StashKey[object]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("servelab", "servelab performance regression suite")
    g.addoption(
        "--profile",
        action="append",
        default=[],
        metavar="NAME",
        help="profile to start and measure (repeatable); default: cpu-smollm2",
    )
    g.addoption(
        "--profiles-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of profile TOML files",
    )
    g.addoption(
        "--endpoint",
        default=None,
        metavar="URL",
        help="measure an already running OpenAI-compatible server (no lifecycle)",
    )
    g.addoption(
        "--model",
        default=None,
        metavar="NAME",
        help="served model name for --endpoint (default: the first in /v1/models)",
    )
    g.addoption(
        "--api-key",
        default=None,
        metavar="KEY",
        help="bearer token for --endpoint (or SERVELAB_API_KEY); never recorded",
    )
    g.addoption(
        "--results-dir",
        default="results",
        metavar="DIR",
        help="where records, logs and raw data go (default: results/)",
    )
    g.addoption(
        "--baselines-dir",
        default="baselines",
        metavar="DIR",
        help="stored baselines (default: baselines/)",
    )
    g.addoption(
        "--update-baselines",
        action="store_true",
        default=False,
        help="write this run's figures as the new baselines (update workflow)",
    )
    g.addoption(
        "--runs",
        type=int,
        default=None,
        metavar="N",
        help="override the number of measured runs per workload",
    )
    g.addoption(
        "--startup-timeout",
        type=float,
        default=None,
        metavar="S",
        help="override the profile's server startup timeout, in seconds",
    )
    g.addoption(
        "--kernels-full",
        action="store_true",
        default=False,
        help="run the full kernel test grid (32,768-token contexts, every axis combined)",
    )


def _parse_options(config: pytest.Config) -> Options:
    endpoint = config.getoption("--endpoint")
    names = list(config.getoption("--profile"))
    if endpoint and names:
        raise pytest.UsageError("--endpoint and --profile exclude each other: pick one target")
    if config.getoption("--model") and not endpoint:
        raise pytest.UsageError("--model only applies to --endpoint")
    runs = config.getoption("--runs")
    if runs is not None and runs < 1:
        raise pytest.UsageError(f"--runs must be at least 1 (got {runs})")
    dirs = [Path(d) for d in config.getoption("--profiles-dir")]
    dirs += default_profile_dirs(config.rootpath) + default_profile_dirs()
    if not names and not endpoint and available_profiles(dirs).get(DEFAULT_PROFILE):
        names = [DEFAULT_PROFILE]
    try:
        profiles = load_named(names, dirs)
    except ServelabError as exc:
        raise pytest.UsageError(str(exc)) from None
    root = config.rootpath
    return Options(
        profiles=tuple(profiles),
        endpoint=endpoint,
        model=config.getoption("--model"),
        api_key=config.getoption("--api-key") or os.environ.get("SERVELAB_API_KEY"),
        results_dir=(root / config.getoption("--results-dir")).resolve(),
        baselines_dir=(root / config.getoption("--baselines-dir")).resolve(),
        update_baselines=bool(config.getoption("--update-baselines")),
        runs=runs,
        startup_timeout_s=config.getoption("--startup-timeout"),
    )


MARKERS = (
    "perf: measures a real serving engine (starts one per selected profile)",
    "kernels: attention/TurboQuant kernels against float64 references",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    options = _parse_options(config)
    config.stash[OPTIONS_KEY] = options
    config.stash[STATE_KEY] = RunState(options)
    start_controller(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_controller(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "servelab_target" not in metafunc.fixturenames:
        return
    options = metafunc.config.stash[OPTIONS_KEY]
    targets = [EXTERNAL] if options.endpoint else [p.name for p in options.profiles]
    metafunc.parametrize("servelab_target", targets, indirect=True, scope="session", ids=targets)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def servelab_options(pytestconfig: pytest.Config) -> Options:
    return pytestconfig.stash[OPTIONS_KEY]


@pytest.fixture(scope="session")
def servelab_state(pytestconfig: pytest.Config) -> RunState:
    return pytestconfig.stash[STATE_KEY]


@pytest.fixture(scope="session")
def servelab_pool(pytestconfig: pytest.Config) -> Iterator[object]:
    from servelab.pool import ServerPool

    options = pytestconfig.stash[OPTIONS_KEY]
    pool = ServerPool(
        options.results_dir / "logs",
        shared_dir=shared_folder(pytestconfig),
        startup_timeout_s=options.startup_timeout_s,
    )
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def servelab_gates(pytestconfig: pytest.Config) -> SharedGates:
    """Runs each target's quality gate once per session, shared by all xdist workers:
    ``servelab_gates.run(target, gate)`` returns the report of the one run."""
    return SessionGates(shared_folder(pytestconfig))


@pytest.fixture(scope="session")
def servelab_target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def servelab_profile(servelab_target: str, servelab_options: Options) -> Profile | None:
    if servelab_target == EXTERNAL:
        return None
    return next(p for p in servelab_options.profiles if p.name == servelab_target)


@pytest.fixture(scope="session")
def servelab_session_endpoint(
    servelab_profile: Profile | None,
    servelab_options: Options,
    servelab_state: RunState,
    servelab_pool: object,
) -> tuple[Endpoint, Identity]:
    from servelab.engine import remote_engine, require_engine
    from servelab.hardware import accelerator_available, host_key
    from servelab.pool import ServerPool

    assert isinstance(servelab_pool, ServerPool)
    if servelab_profile is None:
        return _external_endpoint(servelab_options, remote_engine, host_key)
    hw = servelab_profile.hardware
    ok, why = accelerator_available(hw.accelerator, hw.count)
    if not ok:
        pytest.skip(f"profile {servelab_profile.name!r} needs {hw.count}x {hw.accelerator}: {why}")
    try:
        engine = require_engine(servelab_profile)
        started = servelab_pool.get(servelab_profile)
    except ServelabError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    servelab_state.startup[servelab_profile.name] = started.startup_seconds
    identity = Identity(
        profile=servelab_profile.name,
        engine=engine,
        host=host_key(),
        model=servelab_profile.model.served_name,
    )
    return started.endpoint, identity


def _external_endpoint(
    options: Options, remote_engine: object, host_key: object
) -> tuple[Endpoint, Identity]:
    import httpx

    assert options.endpoint is not None
    base = options.endpoint.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    model = options.model
    if model is None:
        try:
            r = httpx.get(base + "/v1/models", headers=headers, timeout=10.0)
            r.raise_for_status()
            model = str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            pytest.fail(
                f"--endpoint {options.endpoint}: could not list models ({exc}); "
                "check the URL or pass --model",
                pytrace=False,
            )
    assert callable(remote_engine)
    engine = str(remote_engine(base, headers))
    endpoint = Endpoint(base_url=base, model=model, headers=headers, managed=False)
    return endpoint, Identity(profile=EXTERNAL, engine=engine, host="external", model=model)


@pytest.fixture
def servelab_endpoint(
    servelab_session_endpoint: tuple[Endpoint, Identity],
    servelab_profile: Profile | None,
    servelab_pool: object,
) -> Iterator[Endpoint]:
    """The endpoint under test; fails the test with the log tail if the engine died."""
    from servelab.pool import ServerPool

    assert isinstance(servelab_pool, ServerPool)

    def check() -> None:
        if servelab_profile is not None:
            try:
                servelab_pool.ensure_alive(servelab_profile)
            except ServelabError as exc:
                pytest.fail(str(exc), pytrace=False)

    check()
    yield servelab_session_endpoint[0]
    check()


@pytest.fixture
def servelab_identity(servelab_session_endpoint: tuple[Endpoint, Identity]) -> Identity:
    return servelab_session_endpoint[1]


def _perf_session(state: RunState) -> object:
    from servelab.records import PerfSession

    if state.perf is None:
        o = state.options
        headers = [{"Authorization": f"Bearer {o.api_key}"}] if o.api_key else []
        state.perf = PerfSession(
            baselines_dir=o.baselines_dir,
            results_dir=o.results_dir,
            profiles=o.profiles,
            update=o.update_baselines,
            secrets=[o.api_key],
            headers=headers,
        )
    return state.perf


@pytest.fixture
def servelab_record(servelab_state: RunState) -> object:
    """Call with a Figure: it joins the session's results and is judged against its stored
    baseline; a regression (or a refused comparison) fails the calling test with the verdict.
    """
    from servelab.records import PerfSession

    def record(figure: Figure) -> Figure:
        servelab_state.figures.append(figure)
        perf = _perf_session(servelab_state)
        assert isinstance(perf, PerfSession)
        verdict = perf.judge(figure)
        print(f"{figure.label()}\n  verdict: {verdict.text}")
        if verdict.failed and not servelab_state.options.update_baselines:
            pytest.fail(f"{figure.label()}\n{verdict.text}", pytrace=False)
        return figure

    return record


# ---------------------------------------------------------------------------- summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    state = terminalreporter.config.stash.get(STATE_KEY, None)
    if state is None or not state.figures:
        return
    tr = terminalreporter
    tr.section("servelab figures")
    for name, seconds in state.startup.items():
        if seconds is not None:
            tr.write_line(f"server start [{name}]: {seconds:.1f} s (cold process start to ready)")
    for fig in state.figures:
        tr.write_line(fig.label())
    from servelab.records import PerfSession
    from servelab.report import terminal_table

    perf = state.perf
    verdicts = {id(v.figure): v for v in perf.verdicts} if isinstance(perf, PerfSession) else {}
    tr.section("servelab verdicts")
    for line in terminal_table(state.figures, verdicts):
        tr.write_line(line)
    missing = sum(v.status == "no baseline" for v in verdicts.values())
    if missing and not state.options.update_baselines:
        tr.write_line(
            f"{missing} figure(s) have no baseline: create them with "
            "`pytest -m perf --update-baselines`"
        )
    for line in state.messages:
        tr.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    # After every test (fixture teardowns included): a worker that dies later keeps this.
    try:
        return (yield)
    finally:
        state = item.config.stash.get(STATE_KEY, None)
        if state is not None:
            save_worker_part(item.config, state)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the session's record (also after Ctrl-C) and run the baseline update workflow.

    Under xdist a worker only saves its part; the controller writes the one record."""
    import shlex

    from servelab.baselines import servelab_commit, who
    from servelab.quality import LAB_RECORDS_KEY
    from servelab.records import PerfSession, SessionInfo

    state = session.config.stash.get(STATE_KEY, None)
    if state is None or save_worker_part(session.config, state):
        return
    shared = shared_folder(session.config)
    lab = None
    if shared is not None:
        lab = gather_workers(session.config, state, shared, lambda: _perf_session(state))
    # A failed quality gate leaves no figures; the record must still say why.
    if not (state.figures or state.requests or state.invalid_reasons):
        return
    if shared is None:
        lab_records = session.config.stash.get(LAB_RECORDS_KEY, None)
        lab = lab_records.to_dict() if lab_records is not None else None
    perf = _perf_session(state)
    assert isinstance(perf, PerfSession)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", {})
    failed = tuple(getattr(r, "nodeid", "?") for k in ("failed", "error") for r in stats.get(k, []))
    if session.testsfailed and not failed:
        failed = (f"{session.testsfailed} test(s)",)
    interrupted = int(exitstatus) == int(pytest.ExitCode.INTERRUPTED)
    info = SessionInfo(
        started_at=state.started_at,
        finished_at=time.time(),
        command=shlex.join(["pytest", *session.config.invocation_params.args]),
        exit_status=int(exitstatus),
        interrupted=interrupted,
        servelab_commit=servelab_commit(),
        by=who(),
        invalid_reasons=tuple(state.invalid_reasons),
        quality_checks=tuple(state.quality_checks),
        failed_tests=failed,
    )
    logs_dir = state.options.results_dir / "logs"
    logs = [p for p in sorted(logs_dir.glob("*.log")) if p.stat().st_mtime >= state.started_at]
    names = sorted({f.identity.profile for f in state.figures}) or ["session"]
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    label = "-".join([*names, *([worker] if worker else [])])
    try:
        state.messages += perf.finish(
            figures=state.figures,
            session=info,
            requests=state.requests,
            logs=logs,
            label=label,
            lab=lab,
        )
    except (ServelabError, OSError) as exc:
        state.messages.append(f"servelab: could not write the record: {exc}")
