"""Fact recall at depth, in the style of the b70 lab's ``fact-900lines`` smoke.

The prompt is the lab's ``fact-word-v1`` (``session_cache_canary.py --prompt-mode
fact-word``), reproduced byte for byte so servelab's numbers compare with the lab's: N
keyed noise rows for lane L ("Context row 0004 for lane A: ... marker A-0004 ..."), one row
stating the lane's answer word, then the question. The lane fixes where the fact sits, as in
the lab: A/B after row lines//8 (early), C/D after row 3*lines//4 (late), every other lane
after row lines//2 (middle); never before row 3. Answer words A-H are the lab's.

Checking is the lab's too: the first ``[A-Za-z0-9_]+`` run of the output, lower-cased, must
equal the expected word exactly. A near miss ("maples", "mapel") fails like any other miss;
the message says it was close so nobody mistakes it for a flaky pass.

Distractor facts (many key -> word lines that compete with the asked one) are not used: the
embedded CPU default (SmolLM2-135M) cannot answer them (probed: 0 of 3 depths right at 40
lines), while it answers the lab's format at every depth servelab asks.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from servelab.errors import QualityGateError

PROMPT_VERSION = "fact-word-v1"
FACT_WORDS = {
    "A": "maple",
    "B": "cobalt",
    "C": "violet",
    "D": "amber",
    "E": "saffron",
    "F": "pearl",
    "G": "onyx",
    "H": "cedar",
}
Depth = Literal["early", "middle", "late"]
#: The lane servelab asks for each depth: the first lab lane whose fact sits there.
DEPTH_LABELS: dict[str, str] = {"early": "A", "middle": "E", "late": "C"}
#: Characters per token assumed by the *static* context check, chosen as a lower bound on
#: this text so that check never refuses a profile that fits: measured 4.31 for MiniMax
#: (900 lines = 22,540 tokens in the lab) and 3.2 for SmolLM2 (digits split one per token).
#: The exact count comes from the server's tokenizer at run time (`check_fits`).
CHARS_PER_TOKEN_BOUND = 4.5
#: Tokens the chat template / question wrapper may add beyond the prompt text itself.
WRAPPER_TOKENS = 64
_WORD = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class RecallCase:
    label: str  # lane, e.g. "A"
    lines: int  # noise rows
    fact_row: int  # the fact follows this row (0-based)
    expected: str
    prompt: str

    @property
    def depth(self) -> str:
        return depth_of(self.label)

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()

    def describe(self) -> str:
        return (
            f"recall {self.depth} (lane {self.label}, fact after row {self.fact_row} "
            f"of {self.lines})"
        )


@dataclass(frozen=True)
class RecallAnswer:
    case: RecallCase
    text: str
    observed: str
    ok: bool
    problem: str | None  # None when ok

    @property
    def output_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def fact_row(label: str, lines: int) -> int:
    up = label.upper()
    if up in {"A", "B"}:
        return max(3, lines // 8)
    if up in {"C", "D"}:
        return max(3, (lines * 3) // 4)
    return max(3, lines // 2)


def depth_of(label: str) -> str:
    up = label.upper()
    return "early" if up in {"A", "B"} else "late" if up in {"C", "D"} else "middle"


def expected_word(label: str) -> str:
    return FACT_WORDS.get(label.upper(), f"fact{label.lower()}")


def build_case(label: str, lines: int, *, header: str = "") -> RecallCase:
    """The lab's fact-word-v1 prompt for one lane. ``header`` (a first line, e.g. a
    per-run salt) makes prompts unique where a cold pass must not hit the prefix cache;
    the lab's own prompt has none."""
    if lines <= 3:
        raise QualityGateError(
            f"recall lane {label!r}: {lines} lines is too few (the fact follows row 3 at the "
            "earliest); use at least 4 lines"
        )
    if not _WORD.fullmatch(label):
        raise QualityGateError(f"recall lane {label!r}: a lane label is letters/digits only")
    expected = expected_word(label)
    at = fact_row(label, lines)
    rows: list[str] = [header] if header else []
    for i in range(lines):
        rows.append(
            f"Context row {i:04d} for lane {label}: session-cache retrieval "
            f"noise marker {label}-{i:04d}; ignore unrelated colors and words."
        )
        if i == at:
            rows.append(f"IMPORTANT FACT FOR LANE {label}: answer_word = {expected}.")
    prompt = (
        "\n".join(rows) + "\n\n"
        f"Question: What is the answer_word for lane {label}? "
        "Return the exact answer_word only. No punctuation. No explanation.\n"
        "ANSWER: "
    )
    return RecallCase(label=label, lines=lines, fact_row=at, expected=expected, prompt=prompt)


def depth_cases(lines: int, depths: Sequence[str], *, where: str = "recall") -> list[RecallCase]:
    """One case per requested depth (early/middle/late), or QualityGateError naming `where`."""
    bad = [d for d in depths if d not in DEPTH_LABELS]
    if bad or not depths:
        raise QualityGateError(
            f"{where}: workloads.recall.depths {list(depths)!r} must be a non-empty list of "
            f"{sorted(DEPTH_LABELS)}"
        )
    return [build_case(DEPTH_LABELS[d], lines) for d in depths]


def first_word(text: str) -> str:
    m = _WORD.search(text)
    return m.group(0).lower() if m else ""


def check_answer(case: RecallCase, text: str) -> RecallAnswer:
    observed = first_word(text)
    if observed == case.expected:
        return RecallAnswer(case, text, observed, True, None)
    close = len(observed) >= 3 and (
        case.expected in observed
        or observed in case.expected
        or difflib.SequenceMatcher(None, observed, case.expected).ratio() >= 0.75
    )
    kind = "close but not exact" if close else "wrong"
    problem = (
        f"{case.describe()}: expected {case.expected!r}, got {observed!r} ({kind}; "
        f"full output {text!r})"
    )
    return RecallAnswer(case, text, observed, False, problem)


def estimated_tokens(lines: int) -> int:
    """A lower-bound estimate of a recall prompt's tokens (see CHARS_PER_TOKEN_BOUND)."""
    chars = len(build_case("A", max(lines, 4)).prompt)
    return math.ceil(chars / CHARS_PER_TOKEN_BOUND)


def max_lines_for(context_len: int, max_tokens: int) -> int:
    """The most lines whose estimated prompt fits ``context_len`` (0 when none does)."""
    lo, hi = 0, max(4, context_len)  # a line is always more than one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimated_tokens(mid) + WRAPPER_TOKENS + max_tokens <= context_len:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= 4 else 0


def check_fits_estimate(*, lines: int, max_tokens: int, context_len: int, profile: str) -> None:
    """Refuse, before any server starts, a recall workload that cannot fit the context."""
    need = estimated_tokens(lines) + WRAPPER_TOKENS + max_tokens
    if need > context_len:
        raise QualityGateError(
            f"profile {profile!r}: recall workload of {lines} lines needs at least {need} "
            f"tokens (estimate) but model.context_len is {context_len}; lower "
            f"workloads.recall.lines to at most {max_lines_for(context_len, max_tokens)} "
            "or raise the context"
        )


def check_fits(
    *, prompt_tokens: int, max_tokens: int, context_len: int, profile: str, case: str
) -> None:
    """Refuse a recall prompt whose exact (server-counted) length does not fit."""
    if prompt_tokens + max_tokens > context_len:
        raise QualityGateError(
            f"profile {profile!r}: {case} is {prompt_tokens} prompt tokens + {max_tokens} "
            f"output tokens, more than model.context_len {context_len}; lower "
            "workloads.recall.lines"
        )
