"""Quality gates that run before any speed verdict: canaries, output identity, fact recall.

A gate is three checks against the served model, all greedy (temperature 0, top_p 1, a
fixed seed):

- **canaries**: prompts with exact expected answers (a quality file, ``fixtures/quality/``);
  every answer, sequential or concurrent, must match;
- **identity**: each canary is asked ``repeats`` times one after another and ``repeats``
  times all at once; the share of outputs byte-identical to the first must reach the
  profile's ``quality.identity_fraction`` (1.0 on the CPU default; the lab's XPU outputs are
  not always bit-stable across servers, hence the knob);
- **recall**: the lab's fact-word-v1 prompt (`servelab.recall`) with the fact early, in the
  middle and late, sized by the profile's ``workloads.recall``.

A failed gate marks the session's speed results invalid (``RunState.invalid_reasons``): the
perf suite gives no pass verdict and updates no baseline, and the record says why.

Quality file format (TOML)::

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
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


from servelab import recall
from servelab.errors import ClientError, QualityGateError
from servelab.gate_report import CheckResult, GateReport, Outcome
from servelab.server import Endpoint

QUALITY_SCHEMA_VERSION = 1
DEFAULT_SEED = 20260607  # the lab's canary seed (scripts/openai-quality-canary.py)
Api = Literal["chat", "completion"]
_APIS = ("chat", "completion")


# --------------------------------------------------------------------------- quality file


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


def load_quality_file(path: Path) -> QualitySet:
    """Parse and validate a quality file; QualityGateError names the file and the entry."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QualityGateError(f"{path}: quality file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise QualityGateError(f"{path}: invalid TOML: {exc}") from None
    _only(raw, {"schema_version", "seed", "recall", "canary"}, f"{path}")
    if raw.get("schema_version") != QUALITY_SCHEMA_VERSION:
        raise QualityGateError(
            f"{path}: field 'schema_version' must be {QUALITY_SCHEMA_VERSION} "
            f"(got {raw.get('schema_version')!r})"
        )
    seed = raw.get("seed", DEFAULT_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QualityGateError(f"{path}: field 'seed' must be an integer (got {seed!r})")
    style = _recall_style(raw.get("recall", {}), f"{path}: [recall]")
    entries = raw.get("canary", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise QualityGateError(f"{path}: 'canary' must be an array of tables ([[canary]])")
    canaries: list[Canary] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        c = _canary(entry, f"{path}: canary #{i + 1}")
        if c.id in seen:
            raise QualityGateError(f"{path}: canary #{i + 1}: duplicate id {c.id!r}")
        seen.add(c.id)
        canaries.append(c)
    return QualitySet(path=path, seed=seed, canaries=tuple(canaries), recall=style)


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise QualityGateError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _field(table: Mapping[str, Any], key: str, kind: type, where: str, required: bool) -> Any:
    if key not in table:
        if required:
            raise QualityGateError(f"{where}: missing field {key!r} ({kind.__name__})")
        return None
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise QualityGateError(
            f"{where}: field {key!r} must be {kind.__name__} (got {type(value).__name__} {value!r})"
        )
    return value


def _recall_style(table: Any, where: str) -> RecallStyle:
    if not isinstance(table, dict):
        raise QualityGateError(f"{where}: must be a table")
    _only(table, {"api", "lead_in", "session_lanes"}, where)
    api = table.get("api", "completion")
    if api not in _APIS:
        raise QualityGateError(f"{where}: field 'api' must be one of {_APIS} (got {api!r})")
    lead_in = _field(table, "lead_in", str, where, required=False) or ""
    if lead_in and api != "chat":
        raise QualityGateError(f"{where}: 'lead_in' applies only to api = 'chat'")
    try:
        lead_in.format(label="A")
    except (KeyError, IndexError, ValueError) as exc:
        raise QualityGateError(
            f"{where}: 'lead_in' {lead_in!r} may only use the placeholder {{label}} ({exc})"
        ) from None
    lanes = table.get("session_lanes", [])
    if not isinstance(lanes, list) or not all(
        isinstance(x, str) and len(x) == 1 and x.isalpha() and x.isupper() for x in lanes
    ):
        raise QualityGateError(
            f"{where}: 'session_lanes' must be a list of single capital letters (got {lanes!r})"
        )
    if len(set(lanes)) != len(lanes):
        raise QualityGateError(f"{where}: 'session_lanes' repeats a lane: {lanes!r}")
    return RecallStyle(api=api, lead_in=lead_in, session_lanes=tuple(lanes))


def _canary(entry: Mapping[str, Any], where: str) -> Canary:
    cid = entry.get("id")
    if isinstance(cid, str) and cid:
        where = f"{where} ({cid!r})"
    _only(entry, {"id", "api", "prompt", "max_tokens", "expect", "match", "stop"}, where)
    cid = _field(entry, "id", str, where, required=True)
    if not cid.strip():
        raise QualityGateError(f"{where}: field 'id' must not be empty")
    api = entry.get("api", "chat")
    if api not in _APIS:
        raise QualityGateError(f"{where}: field 'api' must be one of {_APIS} (got {api!r})")
    prompt = _field(entry, "prompt", str, where, required=True)
    if not prompt:
        raise QualityGateError(f"{where}: field 'prompt' must not be empty")
    max_tokens = _field(entry, "max_tokens", int, where, required=True)
    if max_tokens < 1:
        raise QualityGateError(f"{where}: field 'max_tokens' must be >= 1 (got {max_tokens})")
    expect = _field(entry, "expect", str, where, required=False)
    match = _field(entry, "match", str, where, required=False)
    if (expect is None) == (match is None):
        raise QualityGateError(f"{where}: give exactly one of 'expect' (exact text) or 'match'")
    if expect is not None and expect != expect.strip():
        raise QualityGateError(f"{where}: 'expect' has surrounding whitespace, which never counts")
    if match is not None:
        try:
            re.compile(match)
        except re.error as exc:
            raise QualityGateError(f"{where}: 'match' is not a valid regex: {exc}") from None
    stop = entry.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise QualityGateError(f"{where}: field 'stop' must be a list of non-empty strings")
    return Canary(cid, api, prompt, max_tokens, expect, match, tuple(stop))


def resolve_quality_path(value: str | None, profile_path: Path | None) -> Path | None:
    """A profile's ``quality.canaries``, relative to the profile file's folder."""
    if value is None:
        return None
    p = Path(value)
    if not p.is_absolute() and profile_path is not None:
        p = profile_path.parent / p
    return p


# --------------------------------------------------------------------------- results
# GateReport and its parts live in servelab.gate_report (imported above).


# --------------------------------------------------------------------------- running


def _payload(
    model: str,
    api: Api,
    prompt: str | Sequence[Mapping[str, str]],
    max_tokens: int,
    seed: int,
    stop: Sequence[str] = (),
) -> dict[str, Any]:
    from servelab.client import chat_payload, completion_payload

    extra: dict[str, Any] = {"stop": list(stop)} if stop else {}
    if api == "completion":
        assert isinstance(prompt, str)
        return completion_payload(
            model, prompt, max_tokens, ignore_eos=False, token_ids=False, seed=seed, extra=extra
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if messages and messages[-1]["role"] == "assistant":
        extra.update(add_generation_prompt=False, continue_final_message=True)
    return chat_payload(
        model, messages, max_tokens, ignore_eos=False, token_ids=False, seed=seed, extra=extra
    )


def recall_payload(
    model: str, style: RecallStyle, case: recall.RecallCase, max_tokens: int, seed: int
) -> dict[str, Any]:
    """One recall request; the completion form stops at a newline, as the lab's canary."""
    if style.api == "completion":
        return _payload(model, "completion", case.prompt, max_tokens, seed, stop=("\n",))
    return _payload(model, "chat", style.messages(case), max_tokens, seed)


def run_canaries(
    endpoint: Endpoint,
    qset: QualitySet,
    *,
    repeats: int,
    identity_fraction: float,
    timeout_s: float,
) -> tuple[CheckResult, CheckResult]:
    """Canary correctness and output identity (sequential repeats, then all at once)."""
    from servelab.loadgen import run_requests

    if not qset.canaries:
        skipped = "no canaries configured"
        return (
            CheckResult("canaries", True, skipped),
            CheckResult("identity", True, skipped),
        )
    repeats = max(1, repeats)
    payloads = [
        _payload(endpoint.model, c.api, c.prompt, c.max_tokens, qset.seed, c.stop)
        for c in qset.canaries
    ]
    seq = [
        run_requests(endpoint, payloads, concurrency=1, timeout_s=timeout_s, progress=False)
        for _ in range(repeats)
    ]
    burst = run_requests(
        endpoint, payloads * repeats, concurrency=None, timeout_s=timeout_s, progress=False
    )
    outcomes: list[Outcome] = []
    problems: list[str] = []
    texts: dict[str, list[str | None]] = {c.id: [] for c in qset.canaries}
    runs = [(f"sequential #{r + 1}", res.records) for r, res in enumerate(seq)]
    runs += [
        (f"concurrent #{k + 1}", burst.records[k * len(payloads) : (k + 1) * len(payloads)])
        for k in range(repeats)
    ]
    for mode, records in runs:
        for c, rec in zip(qset.canaries, records, strict=True):
            if rec.error is not None:
                problem: str | None = f"canary {c.id!r} ({mode}): request failed: {rec.error}"
                texts[c.id].append(None)
            else:
                why = c.judge(rec.text)
                problem = None if why is None else f"{why} [{mode}]"
                texts[c.id].append(rec.text)
            if problem:
                problems.append(problem)
            outcomes.append(
                Outcome(
                    c.id,
                    mode,
                    problem is None,
                    None if rec.error else rec.output_sha256,
                    rec.prompt_tokens,
                    problem,
                )
            )
    n_ok = sum(o.ok for o in outcomes)
    canary_check = CheckResult(
        "canaries",
        not problems,
        f"{n_ok}/{len(outcomes)} canary answers right ({len(qset.canaries)} canaries x "
        f"{repeats} sequential + {repeats} concurrent, seed {qset.seed})",
        tuple(problems),
        tuple(outcomes),
    )
    same = compared = 0
    diffs: list[str] = []
    for cid, outs in texts.items():
        ref = outs[0]
        for k, o in enumerate(outs[1:], start=1):
            compared += 1
            if ref is not None and o == ref:
                same += 1
            else:
                diffs.append(f"canary {cid!r} output #{k + 1} differs from #1: {o!r} vs {ref!r}")
    fraction = same / compared if compared else 1.0
    ok = fraction >= identity_fraction
    identity = CheckResult(
        "identity",
        ok,
        f"{same}/{compared} repeated outputs byte-identical to the first ({fraction:.0%}; "
        f"required {identity_fraction:.0%})",
        () if ok else tuple(diffs),
    )
    return canary_check, identity


def run_recall(
    endpoint: Endpoint,
    style: RecallStyle,
    *,
    lines: int,
    depths: Sequence[str],
    max_tokens: int,
    seed: int,
    context_len: int | None,
    profile: str,
    timeout_s: float,
) -> CheckResult:
    """Fact recall at each depth; refuses (QualityGateError) a prompt that cannot fit."""
    from servelab.loadgen import run_requests
    from servelab.prompts import server_token_counter

    cases = recall.depth_cases(lines, depths, where=f"profile {profile!r}")
    if context_len is not None:
        counter = server_token_counter(endpoint)
        for case in cases:
            try:
                n = counter(case.prompt if style.api == "completion" else style.messages(case))
            except ClientError:
                break  # no /tokenize here: the request itself will say if it is too long
            recall.check_fits(
                prompt_tokens=n,
                max_tokens=max_tokens,
                context_len=context_len,
                profile=profile,
                case=case.describe(),
            )
    payloads = [recall_payload(endpoint.model, style, c, max_tokens, seed) for c in cases]
    result = run_requests(endpoint, payloads, concurrency=1, timeout_s=timeout_s, progress=False)
    outcomes: list[Outcome] = []
    problems: list[str] = []
    for case, rec in zip(cases, result.records, strict=True):
        if rec.error is not None:
            problem: str | None = f"{case.describe()}: request failed: {rec.error}"
        else:
            problem = recall.check_answer(case, rec.text).problem
        if problem:
            problems.append(problem)
        outcomes.append(
            Outcome(
                case.describe(),
                "recall",
                problem is None,
                None if rec.error else rec.output_sha256,
                rec.prompt_tokens,
                problem,
            )
        )
    ok_n = sum(o.ok for o in outcomes)
    tokens = [o.prompt_tokens for o in outcomes if o.prompt_tokens is not None]
    size = _span(tokens)
    return CheckResult(
        "recall",
        not problems,
        f"{ok_n}/{len(cases)} depths recalled exactly ({recall.PROMPT_VERSION}, {lines} lines, "
        f"{size}, {style.api} api)",
        tuple(problems),
        tuple(outcomes),
    )


def run_gate(
    endpoint: Endpoint,
    target: str,
    qset: QualitySet,
    *,
    repeats: int,
    identity_fraction: float,
    recall_lines: int | None,
    recall_depths: Sequence[str] = ("early", "middle", "late"),
    recall_max_tokens: int = 4,
    context_len: int | None = None,
    timeout_s: float = 300.0,
) -> GateReport:
    """All checks, in order. An input problem (QualityGateError) propagates: it is a
    configuration error, not a failed gate."""
    canaries, identity = run_canaries(
        endpoint, qset, repeats=repeats, identity_fraction=identity_fraction, timeout_s=timeout_s
    )
    checks = [canaries, identity]
    if recall_lines is None:
        checks.append(CheckResult("recall", True, "no recall workload configured"))
    else:
        checks.append(
            run_recall(
                endpoint,
                qset.recall,
                lines=recall_lines,
                depths=recall_depths,
                max_tokens=recall_max_tokens,
                seed=qset.seed,
                context_len=context_len,
                profile=target,
                timeout_s=timeout_s,
            )
        )
    return GateReport(
        target=target,
        quality_file=None if qset.path is None else str(qset.path),
        quality_file_sha256=qset.sha256,
        seed=qset.seed,
        checks=tuple(checks),
    )


def _span(tokens: Sequence[int]) -> str:
    if not tokens:
        return "prompt tokens unknown"
    lo, hi = min(tokens), max(tokens)
    return f"{lo} prompt tokens" if lo == hi else f"{lo}-{hi} prompt tokens"
