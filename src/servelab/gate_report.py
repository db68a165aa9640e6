"""What a quality gate found: one report per target, each check with its outcomes.

Plain data with `to_dict` / `from_dict`, so the report of a gate that one process ran travels
to the others (pytest-xdist) and into the session's record unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from servelab.errors import QualityGateError


@dataclass(frozen=True)
class Outcome:
    """One request a check sent: what it was, what came back, whether it was right."""

    case: str
    mode: str  # "sequential #1", "concurrent #2", "recall"
    ok: bool
    output_sha256: str | None
    prompt_tokens: int | None
    problem: str | None


@dataclass(frozen=True)
class CheckResult:
    name: str  # canaries | identity | recall | stuck
    passed: bool
    summary: str
    problems: tuple[str, ...] = ()
    outcomes: tuple[Outcome, ...] = ()


@dataclass(frozen=True)
class GateReport:
    target: str
    quality_file: str | None
    quality_file_sha256: str | None
    seed: int
    checks: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def reasons(self) -> list[str]:
        return [
            f"quality gate [{self.target}] {c.name}: {p}"
            for c in self.checks
            if not c.passed
            for p in (c.problems or (c.summary,))
        ]

    def lines(self) -> list[str]:
        """One line per check, for the record's "quality checks" and the summary."""
        return [
            f"[{self.target}] {c.name}: {'pass' if c.passed else 'FAIL'} - {c.summary}"
            for c in self.checks
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateReport:
        """The report `to_dict` wrote (another process of the session ran the gate)."""
        try:
            checks = tuple(
                CheckResult(
                    str(c["name"]),
                    bool(c["passed"]),
                    str(c["summary"]),
                    tuple(str(p) for p in c["problems"]),
                    tuple(Outcome(**o) for o in c["outcomes"]),
                )
                for c in d["checks"]
            )
            return cls(
                str(d["target"]),
                d["quality_file"],
                d["quality_file_sha256"],
                int(d["seed"]),
                checks,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QualityGateError(f"saved quality gate report is malformed ({exc!r})") from None
