"""The plugin's fixtures: targets (started servers or an external endpoint), each fixed with
its identity and fingerprint once its server is ready, and the measurement a perf test uses.

Registered by `servelab.plugin`, which imports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from servelab.errors import ServelabError
from servelab.figures import Figure, Identity
from servelab.plugin_measure import progress_writer
from servelab.plugin_options import EXTERNAL, Options
from servelab.profiles import Profile
from servelab.redact import SecretHeaders
from servelab.server import Endpoint
from servelab.session import SessionResults
from servelab.target import Target, make_target
from servelab.xdist import shared_folder

if TYPE_CHECKING:
    from servelab.pool import ServerPool

SESSION_T0 = time.monotonic()  # since boot, at plugin load: receipts keep kernel lines after it


def _run(config: pytest.Config) -> Any:
    from servelab.plugin import RUN_KEY

    return config.stash[RUN_KEY]


@pytest.fixture(scope="session")
def servelab_options(pytestconfig: pytest.Config) -> Options:
    options: Options = _run(pytestconfig).options
    return options


@pytest.fixture(scope="session")
def servelab_state(pytestconfig: pytest.Config) -> SessionResults:
    """This process's session results (figures with verdicts, gates, request rows, ...)."""
    results: SessionResults = _run(pytestconfig).results
    return results


@pytest.fixture(scope="session")
def servelab_pool(pytestconfig: pytest.Config) -> Iterator[ServerPool]:
    from servelab.pool import ServerPool

    options = _run(pytestconfig).options
    pool = ServerPool(
        options.results_dir / "logs",
        shared_dir=shared_folder(pytestconfig),
        startup_timeout_s=options.startup_timeout_s,
    )
    dog = _watchdog(pytestconfig)
    dog.start()
    yield pool
    try:
        dog.stop()
        pool.close()
    finally:
        _post_run(pytestconfig, pool)  # issue 25: stops and post-run receipts join the record


def _watchdog(config: pytest.Config) -> Any:
    """While servers run: a `STOP` file in the results folder, host memory under a profile's
    floor, or a new kernel-log fault line ends the session cooperatively (as Ctrl-C does),
    and the record says why."""
    from servelab.watchdog import SessionWatchdog

    run = _run(config)
    profiles = served_profiles(run.options)
    floors = [
        p.limits.min_free_memory_gib for p in profiles if p.limits.min_free_memory_gib is not None
    ]
    return SessionWatchdog(
        run.options.results_dir,
        min_free_memory_gib=max(floors, default=None),
        kernel_log=any(p.hardware.accelerator != "cpu" for p in profiles),
        since_s=SESSION_T0,
        on_trip=lambda reason: run.results.invalidate([reason]),
    )


def served_profiles(options: Options) -> tuple[Profile, ...]:
    """Every profile this session may serve: the selected ones and the A/B side ones (their
    post-run receipts are taken like the selected targets'; one never started is skipped)."""
    extra = () if options.ab is None else options.ab.side_profiles
    names = {p.name for p in options.profiles}
    return (*options.profiles, *(p for p in extra if p.name not in names))


def _receipt_args(options: Options) -> dict[str, Any]:
    from servelab.models import default_cache_dir

    return {"folders": (options.results_dir, default_cache_dir()), "since_s": SESSION_T0}


def _post_run(config: pytest.Config, pool: ServerPool) -> None:
    from servelab.receipts import post_run_into

    run = _run(config)
    run.results.stops.update({n: r.to_dict() for n, r in pool.stops.items()})
    if pool.shared_dir is None:  # under xdist the controller stops the shared engines
        problems = post_run_into(
            run.results.receipts,
            served_profiles(run.options),
            pool.stops,
            **_receipt_args(run.options),
        )
        run.results.invalidate(f"post-run health check: {p}" for p in problems)


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
    servelab_state: SessionResults,
    servelab_pool: ServerPool,
) -> tuple[Endpoint, Identity]:
    """The target's endpoint, started (or reached) once; its `Target` (identity, stack,
    fingerprint) is fixed here and joins the session's results."""
    from servelab.engine import remote_engine
    from servelab.hardware import accelerator_available

    profile = servelab_profile
    if profile is None:
        endpoint, identity = _external_endpoint(servelab_options, remote_engine)
        servelab_state.targets[EXTERNAL] = make_target(identity, None, None)
        return endpoint, identity
    hw = profile.hardware
    ok, why = accelerator_available(hw.accelerator, hw.count)
    if not ok:
        pytest.skip(f"profile {profile.name!r} needs {hw.count}x {hw.accelerator}: {why}")
    return _start_profile(profile, servelab_options, servelab_state, servelab_pool)


def _start_profile(
    profile: Profile, options: Options, state: SessionResults, pool: ServerPool
) -> tuple[Endpoint, Identity]:
    """Admit (a health receipt first; a refusal starts no engine), start and fix the
    target of `profile`: every served target of the session, A's or B's, comes through here."""
    from servelab.engine import EngineExtraMissingError, require_engine
    from servelab.hardware import collect_host
    from servelab.receipts import admit_into

    try:
        engine = require_engine(profile)
        admit_into(  # issue 25: a health receipt first; a refusal starts no engine
            state.receipts,
            profile,
            own_pids=pool.engine_pids(profile),
            **_receipt_args(options),
        )
        started = pool.get(profile)
        host = collect_host()
    except EngineExtraMissingError as exc:  # an optional profile's extra: skip, saying so
        pytest.skip(str(exc))
    except ServelabError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    identity = Identity(
        profile=profile.name, engine=engine, host=host.key, model=profile.model.served_name
    )
    state.targets[profile.name] = make_target(
        identity,
        profile,
        host,
        weights_sha256=started.model.weights_sha256 or None,
        startup_seconds=started.startup_seconds,
        command=started.command,
    )
    return started.endpoint, identity


def side_target(request: pytest.FixtureRequest, profile: Profile) -> Endpoint:
    """A second served target of the session (side B of an A/B, a build of a bisect), given
    everything the selected target gets: hardware check, admission receipt, start by the
    session's pool (so its stop is recorded and its post-run receipt taken at the end), its
    `Target` in the results, the patch check and the quality gate (once per session; a failed
    gate fails the calling test and marks the session invalid), a liveness check."""
    from servelab.hardware import accelerator_available
    from servelab.plugin_gate import gate_side_target

    options: Options = request.getfixturevalue("servelab_options")
    state: SessionResults = request.getfixturevalue("servelab_state")
    pool: ServerPool = request.getfixturevalue("servelab_pool")
    hw = profile.hardware
    ok, why = accelerator_available(hw.accelerator, hw.count)
    if not ok:
        pytest.skip(f"side B profile {profile.name!r} needs {hw.count}x {hw.accelerator}: {why}")
    endpoint, _identity = _start_profile(profile, options, state, pool)
    gate_side_target(request, profile, endpoint)
    try:
        pool.ensure_alive(profile)
    except ServelabError as exc:
        pytest.fail(str(exc), pytrace=False)
    return endpoint


def _external_endpoint(options: Options, remote_engine: Any) -> tuple[Endpoint, Identity]:
    import httpx

    assert options.endpoint is not None
    base = options.endpoint.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    headers = SecretHeaders.bearer(options.api_key)
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
    engine = str(remote_engine(base, headers))
    endpoint = Endpoint(base_url=base, model=model, headers=headers, managed=False)
    return endpoint, Identity(profile=EXTERNAL, engine=engine, host="external", model=model)


@pytest.fixture
def servelab_endpoint(
    servelab_session_endpoint: tuple[Endpoint, Identity],
    servelab_profile: Profile | None,
    servelab_pool: ServerPool,
) -> Iterator[Endpoint]:
    """The endpoint under test; fails the test with the log tail if the engine died."""

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


@pytest.fixture
def servelab_target_info(
    servelab_session_endpoint: tuple[Endpoint, Identity], servelab_state: SessionResults
) -> Target:
    return servelab_state.targets[servelab_session_endpoint[1].profile]


# ---------------------------------------------------------------------------- recording


def _judge(config: pytest.Config) -> Any:
    from servelab.judging import Judge

    run = _run(config)
    if run.judge is None:
        drift = {p.name: p.limits.session_cv for p in run.options.profiles}
        run.judge = Judge(run.options.baselines_dir, drift)
    return run.judge


@pytest.fixture
def servelab_record(
    pytestconfig: pytest.Config, servelab_state: SessionResults, request: pytest.FixtureRequest
) -> Callable[[Figure], Figure]:
    """Call with a Figure: it is judged once, here, against its stored baseline and joins
    the session's results with its verdict; a regression (or a refused comparison) fails the
    calling test with the verdict."""
    options = _run(pytestconfig).options
    write = progress_writer(pytestconfig)

    def record(figure: Figure) -> Figure:
        target = servelab_state.targets.get(figure.identity.profile)
        if target is None:  # a figure of no started target (an external tool's, a test's)
            from servelab.hardware import collect_host

            target = make_target(figure.identity, None, collect_host())
            servelab_state.targets[figure.identity.profile] = target
        from servelab.baselines import Verdict
        from servelab.certify import invalid_note

        invalid = invalid_note(figure.notes)  # issue 24: an INVALID figure is not judged
        verdict = (
            Verdict(figure, "inconclusive", f"not judged: {invalid}")
            if invalid
            else _judge(pytestconfig)(figure, target)
        )
        servelab_state.verdicts.append(verdict)
        # Issue 18 (JUnit properties, added by the formats task): every figure and verdict.
        from servelab.junit import properties

        request.node.user_properties.extend(properties(verdict))
        write(f"{figure.label()}: {verdict.status}")
        if verdict.failed and not options.update_baselines:
            pytest.fail(f"{figure.label()}\n{verdict.text}", pytrace=False)
        return figure

    return record
