"""The plugin's fixtures: targets (started servers or an external endpoint), each fixed with
its identity and fingerprint once its server is ready, and the measurement a perf test uses.

Registered by `servelab.plugin`, which imports them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from servelab.errors import ServelabError
from servelab.figures import Figure, Identity, Shape
from servelab.plugin_options import EXTERNAL, Options
from servelab.profiles import Limits, Profile
from servelab.redact import SecretHeaders
from servelab.server import Endpoint
from servelab.session import SessionResults, request_row
from servelab.target import Target, make_target
from servelab.xdist import shared_folder

if TYPE_CHECKING:
    from servelab.loadgen import RunResult
    from servelab.pool import ServerPool
    from servelab.workloads import Settings

S = TypeVar("S")
SESSION_T0 = time.monotonic()  # since boot, at plugin load: receipts keep kernel lines after it
Run = tuple[dict[str, Any], "RunResult"]  # a run's labels and its result


def _where(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in labels.items())


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
    yield pool
    try:
        pool.close()
    finally:
        _post_run(pytestconfig, pool)  # issue 25: stops and post-run receipts join the record


def _receipt_args(options: Options) -> dict[str, Any]:
    from servelab.models import default_cache_dir

    return {"folders": (options.results_dir, default_cache_dir()), "since_s": SESSION_T0}


def _post_run(config: pytest.Config, pool: ServerPool) -> None:
    from servelab.receipts import post_run_into

    run = _run(config)
    run.results.stops.update({n: r.to_dict() for n, r in pool.stops.items()})
    if pool.shared_dir is None:  # under xdist the controller stops the shared engines
        problems = post_run_into(
            run.results.receipts, run.options.profiles, pool.stops, **_receipt_args(run.options)
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
    from servelab.engine import remote_engine, require_engine
    from servelab.hardware import accelerator_available, collect_host
    from servelab.receipts import admit_into

    profile = servelab_profile
    if profile is None:
        endpoint, identity = _external_endpoint(servelab_options, remote_engine)
        servelab_state.targets[EXTERNAL] = make_target(identity, None, None)
        return endpoint, identity
    hw = profile.hardware
    ok, why = accelerator_available(hw.accelerator, hw.count)
    if not ok:
        pytest.skip(f"profile {profile.name!r} needs {hw.count}x {hw.accelerator}: {why}")
    try:
        engine = require_engine(profile)
        admit_into(  # issue 25: a health receipt first; a refusal starts no engine
            servelab_state.receipts,
            profile,
            own_pids=servelab_pool.engine_pids(profile),
            **_receipt_args(servelab_options),
        )
        started = servelab_pool.get(profile)
        host = collect_host()
    except ServelabError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    identity = Identity(
        profile=profile.name, engine=engine, host=host.key, model=profile.model.served_name
    )
    servelab_state.targets[profile.name] = make_target(
        identity,
        profile,
        host,
        weights_sha256=started.model.weights_sha256 or None,
        startup_seconds=started.startup_seconds,
        command=started.command,
    )
    return started.endpoint, identity


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


def progress_writer(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines that reach the user while pytest captures output: through the
    terminal reporter, or on an xdist worker its own stderr (the controller's terminal)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    workerinput = getattr(config, "workerinput", None)
    prefix = f"[{workerinput['workerid']}] " if workerinput else ""

    def write(line: str) -> None:
        with capman.global_and_fixture_disabled() if capman else _nothing():
            if reporter is not None and not workerinput:
                reporter.write_line(f"servelab: {line}")
            else:
                sys.stderr.write(f"{prefix}servelab: {line}\n")
                sys.stderr.flush()

    return write


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


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


class Measurement:
    """What a perf test needs around its workload: the target, its shape (the profile's, or a
    small one for an external endpoint), run counts, request settings, request rows,
    validity and recording figures by their catalogue names."""

    def __init__(
        self,
        *,
        test: str,
        endpoint: Endpoint,
        profile: Profile | None,
        identity: Identity,
        options: Options,
        results: SessionResults,
        record: Callable[[Figure], Figure],
        report: Callable[[str], None],
    ) -> None:
        self.test = test
        self.endpoint = endpoint
        self.profile = profile
        self.identity = identity
        self.options = options
        self.results = results
        self._record = record
        self.report = report
        self.notes: list[str] = []  # added to every figure this test records
        self.requests = 0  # requests of the runs kept (issue 24: validity and support)
        self.failed = 0  # of which failed
        self.duration_s = 0.0  # their measured time, summed

    @property
    def name(self) -> str:
        return EXTERNAL if self.profile is None else self.profile.name

    @property
    def limits(self) -> Limits:
        return self.profile.limits if self.profile is not None else Limits()

    @property
    def timeout_s(self) -> float:
        """Per-request timeout: --request-timeout, else the profile's."""
        return self.options.request_timeout_s or self.limits.request_timeout_s

    @property
    def settings(self) -> Settings:
        """Request settings bounded by the profile's limits and the command line (a new
        deadline for the whole workload from now, where the profile sets one)."""
        from servelab.workloads import Settings

        limits = None if self.profile is None else self.profile.limits
        return Settings.for_limits(
            limits, request_timeout_s=self.options.request_timeout_s, report=self.progress
        )

    def progress(self, line: str) -> None:
        self.report(f"[{self.name}] {self.test}: {line}")

    def shape(self, workload: str, external: S | None) -> S:
        """The profile's `workloads.<workload>` shape; for an external endpoint `external`.
        A profile without that workload skips the test, saying so."""
        shape = getattr(self.profile.workloads, workload) if self.profile else external
        if shape is None:
            pytest.skip(f"profile {self.name!r} defines no workloads.{workload}")
        return shape

    def runs(self, default: int) -> int:
        return self.options.runs or default

    def keep(
        self,
        runs: Sequence[Run],
        *,
        may_drop: bool = False,
        remeasure: Callable[[list[dict[str, Any]]], list[Run]] | None = None,
    ) -> list[Run]:
        """Keep every request of these runs as raw rows (with their labels) and return the
        runs that count; fail the test, listing why, if a run is not valid.

        A run whose only fault is the client's own timing (its event loop woke late, or it
        saturated a core: on a shared machine another process took the CPU) is measured
        again once with `remeasure(labels)`, or, with `may_drop`, dropped (up to a third of
        the runs). Every figure the test records says which runs were and why."""
        # Each row names its target and its run's bounds, so `servelab verify` can recompute
        # every figure from the rows alone.
        self.results.requests += [
            request_row(
                r,
                test=self.test,
                profile=self.identity.profile,
                run_start_ns=res.start_ns,
                run_end_ns=res.end_ns,
                **labels,
            )
            for labels, res in runs
            for r in res.records
        ]
        problems: list[str] = []
        lagged: list[Run] = []
        for run in runs:
            labels, res = run
            reasons = res.invalid_reasons(self.limits.max_error_rate)
            if (may_drop or remeasure) and reasons and set(reasons) <= set(res.client_lagged()):
                lagged.append(run)
            else:
                problems += [f"{_where(labels)}: {why}" for why in reasons]
        kept = [run for run in runs if not any(run is x for x in lagged)]
        why = "; ".join(f"{_where(labels)}: {res.client_lagged()[0]}" for labels, res in lagged)
        if lagged and remeasure is not None and not problems:
            self.notes.append(f"{len(lagged)} of {len(runs)} runs measured again: {why}")
            self.progress(self.notes[-1])
            again = remeasure([labels for labels, _ in lagged])
            self.keep(again)  # once: a second lag fails the test
            kept += again
        elif lagged and 3 * len(lagged) > len(runs):
            problems.append(f"more than a third of the runs lagged, none counts: {why}")
        elif lagged:
            self.notes.append(f"{len(lagged)} of {len(runs)} runs dropped, not measured: {why}")
            self.progress(self.notes[-1])
        if problems:
            pytest.fail(f"{self.test}: runs are not valid:\n" + "\n".join(problems), pytrace=False)
        if not any(labels.get("again") for labels, _ in runs):  # `again` runs count below
            self.requests += sum(len(res.records) for _, res in kept)
            self.failed += sum(len(res.failed) for _, res in kept)
            self.duration_s += sum(res.duration_s for _, res in kept)
        return kept

    def record(
        self,
        name: str,
        runs: Sequence[float | None],
        shape: Shape,
        *,
        warm: bool = True,
        notes: tuple[str, ...] = (),
        **axis: int,
    ) -> Figure:
        """Record the catalogue's figure `name` (a template such as `"ttft_ms_p{n}"`, filled
        from `axis`); a run without a value is NaN (never 0)."""
        from servelab.catalogue import spec

        values = tuple(float("nan") if v is None else float(v) for v in runs)
        figure = spec(name).figure(
            values,
            shape=shape,
            identity=self.identity,
            warm=warm,
            notes=(*notes, *self.notes, *self.validity(spec(name).name.format(**axis), values)),
            **axis,
        )
        return self._record(figure)

    def validity(self, metric: str, values: Sequence[float]) -> tuple[str, str]:
        """Issue 24: "VALID" or "INVALID: why (what to change)", and the figure's support."""
        from servelab.certify import validity_notes

        duration = self.duration_s or None
        return validity_notes(
            metric, values, self.failed, duration, self.limits.max_error_rate, self.requests
        )


@pytest.fixture
def servelab_measure(
    request: pytest.FixtureRequest,
    servelab_endpoint: Endpoint,
    servelab_profile: Profile | None,
    servelab_identity: Identity,
    servelab_options: Options,
    servelab_state: SessionResults,
    servelab_record: Callable[[Figure], Figure],
) -> Measurement:
    return Measurement(
        test=request.node.originalname or request.node.name,
        endpoint=servelab_endpoint,
        profile=servelab_profile,
        identity=servelab_identity,
        options=servelab_options,
        results=servelab_state,
        record=servelab_record,
        report=progress_writer(request.config),
    )
