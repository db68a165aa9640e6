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

EXTERNAL = "endpoint"
DEFAULT_PROFILE = "cpu-smollm2"


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
