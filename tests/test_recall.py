"""Fact recall prompts (the lab's fact-word-v1), answer checking and context sizing."""

from __future__ import annotations

import pytest

from servelab import recall
from servelab.errors import QualityGateError


def test_prompt_is_the_labs_fact_word_v1() -> None:
    case = recall.build_case("A", 8)
    lines = case.prompt.split("\n")
    assert lines[0] == (
        "Context row 0000 for lane A: session-cache retrieval noise marker A-0000; "
        "ignore unrelated colors and words."
    )
    # A/B: the fact follows row max(3, lines // 8) = 3
    assert lines[4] == "IMPORTANT FACT FOR LANE A: answer_word = maple."
    assert case.prompt.endswith(
        "\n\nQuestion: What is the answer_word for lane A? Return the exact answer_word only. "
        "No punctuation. No explanation.\nANSWER: "
    )
    assert case.prompt.count("Context row") == 8
    assert case.expected == "maple"


@pytest.mark.parametrize(
    ("label", "lines", "row", "depth"),
    [
        ("A", 900, 112, "early"),
        ("B", 40, 5, "early"),
        ("C", 900, 675, "late"),
        ("D", 40, 30, "late"),
        ("E", 900, 450, "middle"),
        ("H", 40, 20, "middle"),
        ("A", 16, 3, "early"),
    ],
)
def test_fact_position_follows_the_lab(label: str, lines: int, row: int, depth: str) -> None:
    case = recall.build_case(label, lines)
    assert case.fact_row == row
    assert case.depth == depth
    body = case.prompt.split("\n")
    assert body[row + 1].startswith(f"IMPORTANT FACT FOR LANE {label}:")


def test_depth_cases_cover_early_middle_late() -> None:
    cases = recall.depth_cases(40, ("early", "middle", "late"))
    assert [(c.label, c.depth, c.expected) for c in cases] == [
        ("A", "early", "maple"),
        ("E", "middle", "saffron"),
        ("C", "late", "violet"),
    ]
    assert cases[0].fact_row < cases[1].fact_row < cases[2].fact_row


def test_unknown_depth_names_the_profile() -> None:
    with pytest.raises(QualityGateError, match=r"profile 'p'.*'deep'"):
        recall.depth_cases(40, ("early", "deep"), where="profile 'p'")


def test_header_makes_prompts_unique_but_keeps_the_fact() -> None:
    a = recall.build_case("A", 10, header="Session A salt 1")
    b = recall.build_case("A", 10, header="Session A salt 2")
    assert a.prompt != b.prompt and a.prompt_sha256 != b.prompt_sha256
    assert a.prompt.split("\n")[1:] == b.prompt.split("\n")[1:]


@pytest.mark.parametrize("text", [" maple.", "maple", ' "Maple"', "\nmaple\n", "maple cedar"])
def test_exact_answers_pass(text: str) -> None:
    ans = recall.check_answer(recall.build_case("A", 8), text)
    assert ans.ok and ans.problem is None and ans.observed == "maple"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (" maples", "close but not exact"),
        (" mapel", "close but not exact"),
        (" map", "close but not exact"),
        (' "A-0', "wrong"),
        ("", "wrong"),
        (" cedar", "wrong"),
    ],
)
def test_near_misses_fail_and_say_so(text: str, kind: str) -> None:
    ans = recall.check_answer(recall.build_case("A", 8), text)
    assert not ans.ok
    assert ans.problem is not None
    assert f"({kind};" in ans.problem
    assert "recall early (lane A, fact after row 3 of 8)" in ans.problem
    assert "expected 'maple'" in ans.problem


def test_estimate_is_a_lower_bound_for_the_labs_900_lines() -> None:
    # The lab measured ~22,540 MiniMax tokens for 900 lines; the estimate must not exceed it.
    est = recall.estimated_tokens(900)
    assert 15_000 < est <= 22_540


def test_context_too_small_names_profile_and_the_fix() -> None:
    with pytest.raises(QualityGateError) as info:
        recall.check_fits_estimate(lines=900, max_tokens=4, context_len=8192, profile="tiny")
    msg = str(info.value)
    assert "profile 'tiny'" in msg and "900 lines" in msg and "8192" in msg
    fit = recall.max_lines_for(8192, 4)
    assert f"at most {fit}" in msg
    recall.check_fits_estimate(lines=fit, max_tokens=4, context_len=8192, profile="tiny")
    with pytest.raises(QualityGateError):
        recall.check_fits_estimate(lines=fit + 1, max_tokens=4, context_len=8192, profile="tiny")


def test_exact_count_check_names_the_case() -> None:
    with pytest.raises(QualityGateError, match=r"profile 'cpu'.*recall late.*1328 prompt tokens"):
        recall.check_fits(
            prompt_tokens=1328,
            max_tokens=4,
            context_len=1024,
            profile="cpu",
            case=recall.build_case("C", 40).describe(),
        )
    recall.check_fits(prompt_tokens=1328, max_tokens=4, context_len=2048, profile="cpu", case="x")


def test_too_few_lines_refused() -> None:
    with pytest.raises(QualityGateError, match="at least 4 lines"):
        recall.build_case("A", 3)
