"""The verdict table as GitHub-flavoured Markdown, appended to `$GITHUB_STEP_SUMMARY` so a
GitHub Actions job page shows every figure and its verdict."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from servelab.baselines import Verdict

ENV = "GITHUB_STEP_SUMMARY"
_MARK = {
    "regression": ":x:",
    "refused": ":no_entry:",
    "improvement": ":rocket:",
    "no change": ":white_check_mark:",
    "no baseline": ":grey_question:",
    "inconclusive": ":warning:",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def markdown(verdicts: Sequence[Verdict], title: str = "servelab verdicts") -> str:
    """A heading, a count per status and one table row per figure."""
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    lines = [f"## {title}", ""]
    if not verdicts:
        return "\n".join([*lines, "No figures were measured.", ""])
    lines.append(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    lines += [
        "",
        "| verdict | metric | profile | shape | value | unit | baseline median | change |",
        "| --- | --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for v in verdicts:
        f = v.figure
        base = v.baseline.summary.median if v.baseline is not None else None
        change = v.comparison.change if v.comparison is not None else None
        shown = "n/a" if change is None else f"{change:+.1%}"
        state = "warm" if f.warm else "cold"
        lines.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    f"{_MARK.get(v.status, '')} {v.status}".strip(),
                    f"`{f.metric}`",
                    f.identity.profile,
                    f"{f.shape.describe()}; {state}",
                    _num(f.value),
                    f.unit,
                    _num(base),
                    shown,
                )
            )
            + " |"
        )
    failed = [v for v in verdicts if v.failed]
    if failed:
        lines += ["", "<details><summary>why</summary>", ""]
        lines += [
            f"- `{v.figure.metric}` ({_cell(v.figure.shape.describe())}): {_cell(v.text)}"
            for v in failed
        ]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def append(verdicts: Sequence[Verdict], environ: Mapping[str, str] | None = None) -> Path | None:
    """Append the table to `$GITHUB_STEP_SUMMARY`; None when it is not set. OSError passes
    through (the caller decides whether it matters)."""
    env = os.environ if environ is None else environ
    target = env.get(ENV)
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(markdown(verdicts) + "\n")
    return path
