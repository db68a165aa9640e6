"""The A/B options (issue 19): parsed once into `Options.ab`, errors that say what to do, and
perf/test_ab.py skipped (no server started) unless one is given."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from servelab.plugin_options import ABOptions, Options, parse_options
from servelab.profiles import Profile

ROOT = Path(__file__).resolve().parents[1]


def options(pytester: pytest.Pytester, *args: str) -> Options:
    return parse_options(pytester.parseconfig(*args))


def test_no_ab_option_means_no_ab(pytester: pytest.Pytester) -> None:
    assert options(pytester).ab is None


def test_ab_options_are_parsed(pytester: pytest.Pytester) -> None:
    ab = options(
        pytester, "--ab-slowdown", "0.05", "--ab-max-runs", "40", "--ab-deadline", "300",
        "--ab-seed", "3", "--ab-output-tokens", "24",
    ).ab  # fmt: skip
    assert ab == ABOptions(None, 0.05, 40, 300.0, 3, 24)
    other = options(pytester, "--ab-profile", "cpu-smollm2").ab
    assert other is not None and other.profile is not None
    assert other.profile.name == "cpu-smollm2" and other.slowdown is None


def test_ab_bisect_builds_are_profiles_or_stand_in_slowdowns(pytester: pytest.Pytester) -> None:
    ab = options(pytester, "--ab-bisect", "0, 0.05,cpu-smollm2,0.3").ab
    assert ab is not None and ab.profile is None and ab.slowdown is None
    assert ab.bisect[:2] == (0.0, 0.05) and ab.bisect[3] == 0.3
    third = ab.bisect[2]
    assert isinstance(third, Profile) and third.name == "cpu-smollm2"
    assert ab.side_profiles == (third,)  # started beside A, gated and receipted as A is


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ab-profile", "cpu-smollm2", "--ab-slowdown", "0"], "exclude each other"),
        (["--ab-bisect", "0,0.3", "--ab-slowdown", "0"], "exclude each other"),
        (["--ab-bisect", "0,,0.3"], "with no empty item"),
        (["--ab-bisect", "0,-0.5"], "--ab-bisect: slowdown -0.5 must be within [0, 10)"),
        (["--ab-bisect", "0,no-such-build"], "--ab-bisect: unknown profile"),
        (["--ab-profile", "no-such-profile"], "--ab-profile: unknown profile"),
        (["--ab-slowdown", "-1"], "--ab-slowdown must be within"),
        (["--ab-slowdown", "0", "--ab-max-runs", "8"], "at least 16 (4 ABBA blocks"),
        (["--ab-slowdown", "0", "--ab-deadline", "0"], "--ab-deadline must be a positive"),
    ],
)
def test_bad_ab_options_say_what_to_do(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    with pytest.raises(pytest.UsageError, match=re.escape(message)):
        options(pytester, *args)


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (
            "perf/test_ab.py::test_ab_decode",
            "interleaved A/B runs only with --ab-profile NAME or --ab-slowdown FRACTION",
        ),
        ("perf/test_ab.py::test_ab_bisect_decode", "the A/B bisect runs only with --ab-bisect"),
    ],
)
def test_the_ab_perf_test_skips_without_an_ab_option_and_starts_nothing(
    tmp_path: Path, node: str, reason: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", node, "-m", "perf", "-rs", "-q",
         "-p", "no:cacheprovider", f"--results-dir={tmp_path}", f"--baselines-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout
    assert reason in out.stdout
    assert "record written" not in out.stdout  # no server was started, nothing measured
