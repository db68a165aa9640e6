"""The verdict table in $GITHUB_STEP_SUMMARY (issue 18 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from servelab.baselines import Verdict
from servelab.catalogue import spec
from servelab.figures import Shape
from servelab.step_summary import append, markdown
from tests.test_export_vllm import IDENT
from tests.test_records import INNER, run


def test_markdown_table_one_row_per_figure() -> None:
    f = spec("output_throughput_c{c}").figure(
        (100.0, 101.0), shape=Shape(32, 64, concurrency=2), identity=IDENT, c=2
    )
    text = markdown([Verdict(f, "no baseline", "no baseline at x | y")])
    lines = text.splitlines()
    assert lines[0] == "## servelab verdicts"
    assert "1 no baseline" in lines
    row = next(line for line in lines if "output_throughput_c2" in line)
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells == [
        ":grey_question: no baseline", "`output_throughput_c2`", "cpu-smollm2",
        "prompt 32, output 64, c2; warm", "100.5", "tok/s", "n/a", "n/a",
    ]  # fmt: skip
    assert "No figures were measured." in markdown([])


def test_append_only_when_set(tmp_path: Path) -> None:
    assert append([], environ={}) is None
    out = tmp_path / "summary.md"
    out.write_text("earlier step\n")
    assert append([], environ={"GITHUB_STEP_SUMMARY": str(out)}) == out
    assert out.read_text().startswith("earlier step\n## servelab verdicts")


def test_session_appends_the_verdict_table(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = pytester.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("SERVELAB_COMMIT", "test-commit")
    pytester.makepyfile(INNER)
    r = run(pytester)
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*verdict table appended to*step-summary.md*"])
    text = summary.read_text()
    assert "| verdict | metric |" in text
    assert "`decode_output_tok_s`" in text and "no baseline" in text


def test_unwritable_summary_does_not_fail_the_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(pytester.path / "missing-dir" / "s.md"))
    monkeypatch.setenv("SERVELAB_COMMIT", "test-commit")
    pytester.makepyfile(INNER)
    r = run(pytester)
    r.assert_outcomes(passed=1)
    assert r.ret == 0
    r.stdout.fnmatch_lines(["*could not append the verdict table to $GITHUB_STEP_SUMMARY*"])
