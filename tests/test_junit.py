"""Every judged figure as JUnit properties of its test case (issue 18 item 2), read back with
xml.etree as a CI would."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.test_records import INNER, run

TWO = (
    INNER
    + """

def test_two(servelab_record):
    servelab_record(fig([10.0, 11.0, 12.0], "first_tok_s"))
    servelab_record(fig([5.0, 6.0], "second_tok_s"))
"""
)


def properties(xml: str, name: str) -> dict[str, str]:
    case = next(c for c in ET.parse(xml).getroot().iter("testcase") if c.get("name") == name)
    return {p.get("name", ""): p.get("value", "") for p in case.iter("property")}


def test_junit_properties_carry_figure_and_verdict(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVELAB_COMMIT", "test-commit")
    pytester.makepyfile(TWO)
    r = run(pytester, "--junitxml=out.xml")
    r.assert_outcomes(passed=2)
    props = properties(str(pytester.path / "out.xml"), "test_two")
    key = "first_tok_s/p32/o64/c1/warm"
    assert props[f"{key}.metric"] == "first_tok_s"
    assert props[f"{key}.unit"] == "tok/s"
    assert props[f"{key}.value"] == "11.0"
    assert props[f"{key}.runs"] == "10.0 11.0 12.0"
    assert props[f"{key}.verdict"] == "no baseline"
    assert props[f"{key}.baseline_median"] == "" and props[f"{key}.change"] == ""
    assert "prompt 32, output 64, c1; warm; fake-profile" in props[f"{key}.labels"]
    assert props["second_tok_s/p32/o64/c1/warm.value"] == "5.5"

    # With a baseline: its median, the change and the verdict.
    pytester.makepyfile(INNER)
    run(pytester, "--update-baselines").assert_outcomes(passed=1)
    monkeypatch.setenv("SCALE", "0.9")
    r = run(pytester, "--junitxml=out2.xml")
    r.assert_outcomes(failed=1)
    props = properties(str(pytester.path / "out2.xml"), "test_decode")
    key = "decode_output_tok_s/p32/o64/c1/warm"
    assert props[f"{key}.verdict"] == "regression"
    assert float(props[f"{key}.baseline_median"]) == 100.0
    assert float(props[f"{key}.value"]) == pytest.approx(90.0)
    assert float(props[f"{key}.change"]) == pytest.approx(-0.1)
