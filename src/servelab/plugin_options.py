"""The plugin's command-line options, parsed once into a frozen `Options` record.

Every servelab option is defined here, in the installed plugin, so it is known wherever
pytest runs (no option lives in a conftest.py); errors are `pytest.UsageError`s that say
what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from servelab.errors import ServelabError
from servelab.profiles import Profile, available_profiles, default_profile_dirs, load_named
from servelab.redact import Secret
from servelab.telemetry import DEFAULT_INTERVAL_MS, MODES, Mode

EXTERNAL = "endpoint"
DEFAULT_PROFILE = "cpu-smollm2"


@dataclass(frozen=True)
class ABOptions:
    """Interleaved A/B (issue 19, `servelab.ab`): side A is the selected profile, side B
    another profile (`profile`) or A's server through a delaying proxy adding `slowdown`
    times A's measured TPOT per token (a stand-in for a slower engine; 0 for A/A). Or a
    bisect (`bisect`, `servelab.ab_bisect`): the later builds, oldest first, each a profile
    or a stand-in slowdown as above; the reference build is A."""

    profile: Profile | None
    slowdown: float | None
    max_runs: int | None  # both sides together; None: enough for 10 % run noise
    deadline_s: float | None
    seed: int | None  # block orders; None: drawn, and printed
    output_tokens: int | None  # per run; None: the profile's decode shape
    bisect: tuple[Profile | float, ...] = ()  # --ab-bisect: builds after A, oldest first

    @property
    def side_profiles(self) -> tuple[Profile, ...]:
        """The profiles this A/B may start beside A (side B, the bisect's profile builds)."""
        both = (self.profile, *self.bisect)
        return tuple(b for b in both if isinstance(b, Profile))


@dataclass(frozen=True)
class Options:
    profiles: tuple[Profile, ...]
    endpoint: str | None
    model: str | None
    api_key: Secret | None  # shows itself as *** in tracebacks
    results_dir: Path
    baselines_dir: Path
    update_baselines: bool
    runs: int | None
    startup_timeout_s: float | None
    quality_file: Path | None = None
    request_timeout_s: float | None = None
    gate_timeout_s: float | None = None
    ab: ABOptions | None = None  # issue 19: interleaved A/B (perf/test_ab.py)
    telemetry: Mode = "auto"  # issue 16 item 3: accelerator telemetry per measured run
    telemetry_interval_ms: float = DEFAULT_INTERVAL_MS


def add_options(parser: pytest.Parser) -> None:
    g = parser.getgroup("servelab", "servelab performance regression suite")
    add = g.addoption
    add(
        "--profile",
        action="append",
        default=[],
        metavar="NAME",
        help="profile to start and measure (repeatable); default: cpu-smollm2",
    )
    add(
        "--cards",
        default=None,
        metavar="N[,N...]",
        help="of each profile's [cards] axis, only these card counts (e.g. 1,2); each count "
        "is its own target, NAME@2cards (docs/cards.md)",
    )
    add(
        "--profiles-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of profile TOML files",
    )
    add(
        "--endpoint",
        default=None,
        metavar="URL",
        help="measure an already running OpenAI-compatible server (no lifecycle)",
    )
    add(
        "--model",
        default=None,
        metavar="NAME",
        help="served model name for --endpoint (default: the first in /v1/models)",
    )
    add(
        "--api-key",
        default=None,
        metavar="KEY",
        help="bearer token for --endpoint (or SERVELAB_API_KEY); never recorded or printed",
    )
    add(
        "--results-dir",
        default="results",
        metavar="DIR",
        help="where records, logs and raw data go (default: results/)",
    )
    add(
        "--baselines-dir",
        default="baselines",
        metavar="DIR",
        help="stored baselines (default: baselines/)",
    )
    add(
        "--update-baselines",
        action="store_true",
        default=False,
        help="write this run's figures as the new baselines (update workflow); "
        "a refused update fails the session",
    )
    add(
        "--runs",
        type=int,
        default=None,
        metavar="N",
        help="override the number of measured runs per workload",
    )
    add(
        "--startup-timeout",
        type=float,
        default=None,
        metavar="S",
        help="override the profile's server startup timeout, in seconds",
    )
    add(
        "--request-timeout",
        type=float,
        default=None,
        metavar="S",
        help="override the profile's per-request timeout (limits.request_timeout_s)",
    )
    add(
        "--gate-timeout",
        type=float,
        default=None,
        metavar="S",
        help="bound the whole quality gate of a target, in seconds",
    )
    add(
        "--quality-file",
        default=None,
        metavar="TOML",
        help="quality gate file (canaries, recall style) overriding the profile's; "
        "required with --endpoint",
    )
    add(
        "--telemetry",
        default="auto",
        choices=MODES,
        help="accelerator telemetry per measured run (power, energy, memory): auto (NVML "
        "for cuda profiles, xpu-smi for xpu, none for cpu), off, nvml or xpu-smi",
    )
    add(
        "--telemetry-interval-ms",
        type=float,
        default=DEFAULT_INTERVAL_MS,
        metavar="MS",
        help=f"telemetry sampling interval (default {DEFAULT_INTERVAL_MS:g} ms; xpu-smi's "
        "screen dump samples in whole seconds)",
    )
    add(
        "--ab-profile",
        default=None,
        metavar="NAME",
        help="interleaved A/B: measure the selected profile (A) and NAME (B) alternately in "
        "randomized ABBA blocks until a sequential verdict (perf/test_ab.py)",
    )
    add(
        "--ab-slowdown",
        type=float,
        default=None,
        metavar="FRACTION",
        help="interleaved A/B against a stand-in B: A's server through a proxy adding "
        "FRACTION of A's TPOT per token (0.05: a 5%% slowdown; 0: A/A)",
    )
    add(
        "--ab-max-runs",
        type=int,
        default=None,
        metavar="N",
        help="A/B run budget, both sides together (default: enough for 10%% run noise)",
    )
    add(
        "--ab-deadline",
        type=float,
        default=None,
        metavar="S",
        help="stop the A/B comparison after about S seconds (the verdict says so)",
    )
    add(
        "--ab-bisect",
        default=None,
        metavar="BUILDS",
        help="bisect for the first regressed build: BUILDS is a comma-separated list, oldest "
        "first, of profile names or stand-in slowdowns (fractions of A's TPOT added per token "
        "by a proxy); the reference build is the selected target (A) (docs/verdicts.md)",
    )
    add("--ab-seed", type=int, default=None, metavar="N", help="seed of the A/B block orders")
    add(
        "--ab-output-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens per A/B run (default: the profile's decode shape)",
    )
    add(
        "--kernels-full",
        action="store_true",
        default=False,
        help="run the full kernel test grid (32,768-token contexts, every axis combined)",
    )


def _positive(config: pytest.Config, name: str) -> float | None:
    value = config.getoption(name)
    if value is not None and not value > 0:
        raise pytest.UsageError(f"{name} must be a positive number of seconds (got {value})")
    return None if value is None else float(value)


def _slowdown(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _bisect_builds(text: str, dirs: list[Path]) -> tuple[Profile | float, ...]:
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise pytest.UsageError(
            f"--ab-bisect {text!r}: give a comma-separated list of builds after A, oldest "
            "first, with no empty item (e.g. --ab-bisect 0,0,0.05,0.05)"
        )
    builds: list[Profile | float] = []
    for item in items:
        fraction = _slowdown(item)
        if fraction is not None:
            if not 0 <= fraction < 10:
                raise pytest.UsageError(
                    f"--ab-bisect: slowdown {item} must be within [0, 10) (a fraction of A's "
                    "TPOT added per token)"
                )
            builds.append(fraction)
            continue
        try:
            (profile,) = load_named([item], dirs)
        except ServelabError as exc:
            raise pytest.UsageError(f"--ab-bisect: {exc}") from None
        builds.append(profile)
    return tuple(builds)


def _ab_options(config: pytest.Config, dirs: list[Path]) -> ABOptions | None:
    name, slowdown = config.getoption("--ab-profile"), config.getoption("--ab-slowdown")
    builds = config.getoption("--ab-bisect")
    if name is None and slowdown is None and builds is None:
        return None
    if sum(x is not None for x in (name, slowdown, builds)) > 1:
        raise pytest.UsageError(
            "--ab-profile, --ab-slowdown and --ab-bisect exclude each other: one comparison "
            "a session"
        )
    if slowdown is not None and not 0 <= slowdown < 10:
        raise pytest.UsageError(f"--ab-slowdown must be within [0, 10) (got {slowdown})")
    runs, tokens = config.getoption("--ab-max-runs"), config.getoption("--ab-output-tokens")
    if runs is not None and runs < 16:
        raise pytest.UsageError(f"--ab-max-runs must be at least 16 (4 ABBA blocks; got {runs})")
    if tokens is not None and tokens < 2:
        raise pytest.UsageError(f"--ab-output-tokens must be at least 2 (got {tokens})")
    try:
        (profile,) = load_named([name], dirs) if name is not None else (None,)
    except ServelabError as exc:
        raise pytest.UsageError(f"--ab-profile: {exc}") from None
    return ABOptions(
        profile, slowdown, runs, _positive(config, "--ab-deadline"),
        config.getoption("--ab-seed"), tokens,
        () if builds is None else _bisect_builds(builds, dirs),
    )  # fmt: skip


def _root(config: pytest.Config) -> Path:
    """Where relative --results-dir / --baselines-dir resolve: the project's root (where its
    pyproject.toml is), else the directory pytest was started in."""
    inipath = config.inipath
    return inipath.parent if inipath is not None else config.invocation_params.dir


def parse_options(config: pytest.Config) -> Options:
    endpoint = config.getoption("--endpoint")
    names = list(config.getoption("--profile"))
    if endpoint and names:
        raise pytest.UsageError("--endpoint and --profile exclude each other: pick one target")
    if config.getoption("--model") and not endpoint:
        raise pytest.UsageError("--model only applies to --endpoint")
    runs = config.getoption("--runs")
    if runs is not None and runs < 1:
        raise pytest.UsageError(f"--runs must be at least 1 (got {runs})")
    root = _root(config)
    dirs = [(config.invocation_params.dir / d) for d in config.getoption("--profiles-dir")]
    dirs += default_profile_dirs(root) + default_profile_dirs()
    if not names and not endpoint and available_profiles(dirs).get(DEFAULT_PROFILE):
        names = [DEFAULT_PROFILE]
    try:
        from servelab.cards import expand_all, parse_counts

        cards = config.getoption("--cards")
        only = None if cards is None else parse_counts(cards)
        # A [cards] axis becomes one target per card count (NAME@2cards), each its own server.
        profiles = list(expand_all(load_named(names, dirs), only))
    except ServelabError as exc:
        raise pytest.UsageError(str(exc)) from None
    quality = config.getoption("--quality-file")
    key = config.getoption("--api-key") or os.environ.get("SERVELAB_API_KEY")
    interval = float(config.getoption("--telemetry-interval-ms"))
    if not interval >= 10:
        raise pytest.UsageError(f"--telemetry-interval-ms must be at least 10 (got {interval:g})")
    ab = _ab_options(config, dirs)
    return Options(
        profiles=tuple(profiles),
        endpoint=endpoint,
        model=config.getoption("--model"),
        api_key=Secret(key) if key else None,
        results_dir=(root / config.getoption("--results-dir")).resolve(),
        baselines_dir=(root / config.getoption("--baselines-dir")).resolve(),
        update_baselines=bool(config.getoption("--update-baselines")),
        runs=runs,
        startup_timeout_s=_positive(config, "--startup-timeout"),
        quality_file=None if quality is None else (config.invocation_params.dir / quality),
        request_timeout_s=_positive(config, "--request-timeout"),
        gate_timeout_s=_positive(config, "--gate-timeout"),
        ab=ab,
        telemetry=config.getoption("--telemetry"),
        telemetry_interval_ms=interval,
    )


def find_setup_again(config: pytest.Config, args: list[str]) -> None:
    """Redo pytest's rootdir/ini discovery with servelab's options known (see
    `servelab.plugin.pytest_load_initial_conftests`). Touches pytest's private config fields
    (`_rootpath`, `_inipath`, `_inicfg`, `_inicache`): pinned by tests/test_plugin.py."""
    from _pytest.config.findpaths import determine_setup

    if "--profiles-dir" not in args:  # only the space form is read wrongly
        return
    ns = config.known_args_namespace
    rootpath, inipath, inicfg, ignored = determine_setup(
        inifile=ns.inifilename,
        override_ini=ns.override_ini,
        args=ns.file_or_dir,
        rootdir_cmd_arg=ns.rootdir or None,
        invocation_dir=config.invocation_params.dir,
    )
    if (rootpath, inipath) == (config.rootpath, config.inipath):
        return
    had_ini = config.inipath is not None
    config._rootpath = rootpath
    config._inipath = inipath
    config._inicfg = inicfg
    config._ignored_config_files = ignored
    config._inicache.clear()
    ns.confcutdir = str(inipath.parent if inipath is not None else rootpath)
    if not had_ini:
        args[:] = [*config.getini("addopts"), *args]
