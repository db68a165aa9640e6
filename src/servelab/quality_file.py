"""The quality file: canaries with exact expected answers, and how recall prompts are sent.

Format (TOML), read through `servelab.schema` (unknown fields, missing fields and wrong
types name the file, the canary by number and id, and the field)::

    schema_version = 1
    seed = 20260607                  # request seed for every gate request
    [recall]
    api = "chat"                     # or "completion" (the lab's raw prompt)
    lead_in = "The answer_word for lane {label} is"   # chat: assistant text to continue
    session_lanes = ["B", "C"]       # lanes of the session-cache sessions (default A, B, ...)
    [[canary]]
    id = "capital-france"
    api = "chat"                     # or "completion"
    prompt = "What is the capital of France?"
    max_tokens = 24
    expect = "The capital of France is Paris."      # exact (surrounding whitespace ignored)
    # match = '^\\s*7\\s*$'          # or a regular expression the whole output must match
    # stop = ["\\n"]
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from servelab import recall, schema
from servelab.errors import QualityGateError
from servelab.files import read_toml

QUALITY_SCHEMA_VERSION = 1
DEFAULT_SEED = 20260607  # the lab's canary seed (scripts/openai-quality-canary.py)
Api = Literal["chat", "completion"]
_APIS = ("chat", "completion")


@dataclass(frozen=True)
class Canary:
    id: str
    api: Api
    prompt: str
    max_tokens: int
    expect: str | None = None
    match: str | None = None
    stop: tuple[str, ...] = ()

    def judge(self, text: str) -> str | None:
        """None when `text` is right; otherwise why not."""
        if self.expect is not None:
            if text.strip() == self.expect:
                return None
            close = _norm(text) == _norm(self.expect) or self.expect.lower() in text.lower()
            kind = "close but not exact" if close else "wrong"
            return f"canary {self.id!r}: expected {self.expect!r}, got {text!r} ({kind})"
        assert self.match is not None  # guaranteed by load_quality_file
        if re.fullmatch(self.match, text):
            return None
        return f"canary {self.id!r}: output {text!r} does not fully match /{self.match}/"


@dataclass(frozen=True)
class RecallStyle:
    api: Api = "completion"
    lead_in: str = ""
    #: Lanes the session-cache workload gives its sessions, in order (default A, B, C, ...).
    session_lanes: tuple[str, ...] = ()

    def messages(self, case: recall.RecallCase) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": case.prompt}]
        if self.lead_in:
            msgs.append({"role": "assistant", "content": self.lead_in.format(label=case.label)})
        return msgs


@dataclass(frozen=True)
class QualitySet:
    path: Path | None
    seed: int
    canaries: tuple[Canary, ...]
    recall: RecallStyle

    @property
    def sha256(self) -> str | None:
        return None if self.path is None else _sha256_file(self.path)


def _norm(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s).strip().lower()


def _sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _CanaryEntry:
    """A ``[[canary]]`` table as written (api defaults to chat)."""

    id: str
    prompt: str
    max_tokens: int
    api: Api = "chat"
    expect: str | None = None
    match: str | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class _QualityFile:
    schema_version: int
    seed: int = DEFAULT_SEED
    recall: RecallStyle = RecallStyle()
    canary: tuple[_CanaryEntry, ...] = ()


def _locate(steps: Sequence[schema.Step], data: Any) -> schema.Place:
    """Canaries by number and id (``canary #2 ('seven')``), the recall table as ``[recall]``."""
    where, rest = "", list(steps)
    if len(rest) >= 2 and rest[0] == ("field", "canary") and rest[1][0] == "index":
        i = int(rest[1][1])
        entries = data.get("canary") if isinstance(data, dict) else None
        entry = entries[i] if isinstance(entries, list) and i < len(entries) else None
        cid = entry.get("id") if isinstance(entry, dict) else None
        where = f"canary #{i + 1}" + (f" ({cid!r})" if isinstance(cid, str) and cid else "")
        rest = rest[2:]
    elif len(rest) >= 2 and rest[0] == ("field", "recall"):
        where, rest = "[recall]", rest[1:]
    inner = schema.nested(rest, data)
    joined = ": ".join(w for w in (where, inner.where) if w)
    return schema.Place(joined, inner.field, inner.item)


def load_quality_file(path: Path) -> QualitySet:
    """Parse and validate a quality file; QualityGateError names the file and the entry."""
    raw = read_toml(path, error=QualityGateError, what="quality file")
    schema.check_version(raw, QUALITY_SCHEMA_VERSION, file=path, error=QualityGateError)
    parsed = schema.read(_QualityFile, raw, file=path, error=QualityGateError, locate=_locate)
    style = _recall_style(parsed.recall, f"{path}: [recall]")
    canaries: list[Canary] = []
    seen: set[str] = set()
    for i, entry in enumerate(parsed.canary):
        c = _canary(entry, f"{path}: canary #{i + 1} ({entry.id!r})")
        if c.id in seen:
            raise QualityGateError(f"{path}: canary #{i + 1}: duplicate id {c.id!r}")
        seen.add(c.id)
        canaries.append(c)
    return QualitySet(path=path, seed=parsed.seed, canaries=tuple(canaries), recall=style)


def _recall_style(style: RecallStyle, where: str) -> RecallStyle:
    if style.lead_in and style.api != "chat":
        raise QualityGateError(f"{where}: 'lead_in' applies only to api = 'chat'")
    try:
        style.lead_in.format(label="A")
    except (KeyError, IndexError, ValueError) as exc:
        raise QualityGateError(
            f"{where}: 'lead_in' {style.lead_in!r} may only use the placeholder {{label}} ({exc})"
        ) from None
    lanes = list(style.session_lanes)
    if not all(len(x) == 1 and x.isalpha() and x.isupper() for x in lanes):
        raise QualityGateError(
            f"{where}: 'session_lanes' must be a list of single capital letters (got {lanes!r})"
        )
    if len(set(lanes)) != len(lanes):
        raise QualityGateError(f"{where}: 'session_lanes' repeats a lane: {lanes!r}")
    return style


def _canary(entry: _CanaryEntry, where: str) -> Canary:
    if not entry.id.strip():
        raise QualityGateError(f"{where}: field 'id' must not be empty")
    if not entry.prompt:
        raise QualityGateError(f"{where}: field 'prompt' must not be empty")
    if entry.max_tokens < 1:
        raise QualityGateError(f"{where}: field 'max_tokens' must be >= 1 (got {entry.max_tokens})")
    expect, match = entry.expect, entry.match
    if (expect is None) == (match is None):
        raise QualityGateError(f"{where}: give exactly one of 'expect' (exact text) or 'match'")
    if expect is not None and expect != expect.strip():
        raise QualityGateError(f"{where}: 'expect' has surrounding whitespace, which never counts")
    if match is not None:
        try:
            re.compile(match)
        except re.error as exc:
            raise QualityGateError(f"{where}: 'match' is not a valid regex: {exc}") from None
    if not all(entry.stop):
        raise QualityGateError(f"{where}: field 'stop' must be a list of non-empty strings")
    return Canary(entry.id, entry.api, entry.prompt, entry.max_tokens, expect, match, entry.stop)


def resolve_quality_path(value: str | None, profile_path: Path | None) -> Path | None:
    """A profile's ``quality.canaries``, relative to the profile file's folder."""
    if value is None:
        return None
    p = Path(value)
    if not p.is_absolute() and profile_path is not None:
        p = profile_path.parent / p
    return p
