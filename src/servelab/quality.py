"""(Over 400 lines: the gate and its end-of-session re-check ask the same canaries the same way.)
Quality gates that run before any speed verdict: canaries, output identity, fact recall.

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

A failed gate marks the session's speed results invalid (``SessionResults.invalid_reasons``): the
perf suite gives no pass verdict and updates no baseline, and the record says why.

The gate is bounded (`GateLimits`): each request by its timeouts, the whole gate by a
deadline, and it stops at the first sign that the server is stuck (a request that got no
first token in time while no other got a token): the check that saw it fails with that
reason and the later checks are "not run", instead of every canary waiting out its timeout.

The quality file (canaries, recall style) is read by `servelab.quality_file`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servelab import recall
from servelab.errors import ClientError, ServelabError
from servelab.gate_report import CheckResult, GateReport, Outcome

# The quality file's names, re-exported (its home is servelab.quality_file).
from servelab.quality_file import DEFAULT_SEED as DEFAULT_SEED
from servelab.quality_file import QUALITY_SCHEMA_VERSION as QUALITY_SCHEMA_VERSION
from servelab.quality_file import Api as Api
from servelab.quality_file import Canary as Canary
from servelab.quality_file import QualitySet as QualitySet
from servelab.quality_file import RecallStyle as RecallStyle
from servelab.quality_file import load_quality_file as load_quality_file
from servelab.quality_file import resolve_quality_path as resolve_quality_path
from servelab.server import Endpoint

if TYPE_CHECKING:
    from servelab.loadgen import RunResult

# --------------------------------------------------------------------------- results
# GateReport and its parts live in servelab.gate_report (imported above).


# --------------------------------------------------------------------------- running


class GateStopped(ServelabError):
    """The gate stopped early: the server is stuck, or the gate's deadline passed."""


@dataclass(frozen=True)
class GateLimits:
    """How long the gate may take: each request (in all and until its first token) and the
    whole gate (``deadline_ns``, a ``perf_counter_ns`` value; None: no deadline)."""

    timeout_s: float = 300.0
    first_token_timeout_s: float | None = None
    deadline_ns: int | None = None
    deadline_s: float | None = None  # what the deadline was, for the message

    @classmethod
    def starting_now(
        cls, timeout_s: float, first_token_timeout_s: float | None, deadline_s: float | None
    ) -> GateLimits:
        deadline = None if deadline_s is None else time.perf_counter_ns() + int(deadline_s * 1e9)
        return cls(timeout_s, first_token_timeout_s, deadline, deadline_s)

    def left_s(self) -> float:
        """Seconds a request may still take; GateStopped once the deadline has passed."""
        if self.deadline_ns is None:
            return self.timeout_s
        left = (self.deadline_ns - time.perf_counter_ns()) / 1e9
        if left <= 0:
            raise GateStopped(self._late())
        return min(self.timeout_s, left)

    def run(
        self, endpoint: Endpoint, payloads: Sequence[Mapping[str, Any]], concurrency: int | None
    ) -> RunResult:
        """One run of gate requests, each with the engine's own fields (`engine_fields`);
        GateStopped if it shows the server stuck or ran late."""
        from servelab.loadgen import run_requests

        self.left_s()
        fields = engine_fields(endpoint)
        res = run_requests(
            endpoint,
            [{**p, **fields} for p in payloads] if fields else payloads,
            concurrency=concurrency,
            timeout_s=self.timeout_s,
            first_token_timeout_s=self.first_token_timeout_s,
            deadline_ns=self.deadline_ns,
            stop_when_stuck=True,
            progress=False,
        )
        why = res.stuck()
        if why is not None:
            raise GateStopped(
                f"the server is stuck: {why}. The gate stopped here instead of waiting the "
                "same timeout for every request; look at the server's log "
                "(limits.first_token_timeout_s or --request-timeout bounds the wait)"
            )
        if (
            res.failed
            and self.deadline_ns is not None
            and time.perf_counter_ns() >= self.deadline_ns
        ):
            raise GateStopped(self._late() + ": " + "; ".join(res.error_reasons(3)))
        return res

    def _late(self) -> str:
        return (
            f"the gate did not finish within its {self.deadline_s:g} s "
            "(limits.gate_timeout_s or --gate-timeout)"
        )


def engine_fields(endpoint: Endpoint) -> dict[str, Any]:
    """The body fields the engine's measured requests carry (`EngineTraits.measured_extra`):
    the gate's requests carry them too, so each answer is computed afresh. llama.cpp reuses a
    slot's cached prompt unless told not to, and its logits for a cached prompt need not be
    the same (H100, 2026-12-07: a canary asked alone at the end of the session returned,
    byte for byte, the answer its concurrent ask had given, not its sequential one: the
    slot's KV came from the batch)."""
    from servelab.engine_traits import traits_of

    return dict(traits_of(endpoint.profile).measured_extra)


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
    limits: GateLimits | None = None,
) -> tuple[CheckResult, CheckResult]:
    """Canary correctness and output identity (sequential repeats, then all at once).

    ``limits`` (default: ``timeout_s`` per request, nothing else) bound it; GateStopped when
    the server is shown stuck or the deadline passes."""
    lim = limits or GateLimits(timeout_s)
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
    seq = [lim.run(endpoint, payloads, concurrency=1) for _ in range(repeats)]
    burst = lim.run(endpoint, payloads * repeats, concurrency=None)
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


#: The check's name for the canaries asked again at the end of a session.
CANARIES_AGAIN = "canaries again"


def end_gate_key(target: str) -> str:
    """Where the end-of-session canary check is kept (`SessionResults.gates`): beside the
    target's own gate, never replacing it (under xdist the first worker's gate wins)."""
    return f"{target} (end of session)"


def recheck_canaries(
    endpoint: Endpoint,
    qset: QualitySet,
    start: GateReport,
    *,
    limits: GateLimits,
) -> CheckResult:
    """Each canary asked once more, one at a time, as the gate asked it (greedy, the same
    seed), after the session's load: its answer must still be right and byte-identical to
    the gate's first sequential answer (`start`, the session's opening gate). A changed
    answer means the server's state drifted under load (a cache, a batch, a leak): the
    session's speed results no longer describe the server the gate passed."""
    if not qset.canaries:
        return CheckResult(CANARIES_AGAIN, True, "no canaries configured")
    first = {
        o.case: o.output_sha256
        for c in start.checks
        if c.name == "canaries"
        for o in c.outcomes
        if o.mode == "sequential #1"
    }
    payloads = [
        _payload(endpoint.model, c.api, c.prompt, c.max_tokens, qset.seed, c.stop)
        for c in qset.canaries
    ]
    res = limits.run(endpoint, payloads, concurrency=1)
    problems: list[str] = []
    outcomes: list[Outcome] = []
    same = 0
    for c, rec in zip(qset.canaries, sorted(res.records, key=lambda r: r.index), strict=True):
        why: str | None
        if rec.error is not None:
            why = f"canary {c.id!r} (end of session): request failed: {rec.error}"
        else:
            why = c.judge(rec.text)
            was = first.get(c.id)
            if was is None:
                why = why or f"canary {c.id!r}: the opening gate has no answer to compare with"
            elif rec.output_sha256 != was:
                why = (
                    f"canary {c.id!r}: the answer at the end of the session differs from the "
                    f"start ({rec.text!r}; sha256 {rec.output_sha256[:12]} vs {was[:12]})"
                    + (f"; {why}" if why else "")
                )
            else:
                same += 1
        problems += [why] if why else []
        sha = None if rec.error else rec.output_sha256
        outcomes.append(Outcome(c.id, "end of session", why is None, sha, rec.prompt_tokens, why))
    n = len(qset.canaries)
    return CheckResult(
        CANARIES_AGAIN,
        not problems,
        f"{same}/{n} canary answers at the end of the session identical to the start "
        f"(seed {qset.seed})",
        tuple(problems),
        tuple(outcomes),
    )


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
    limits: GateLimits | None = None,
) -> CheckResult:
    """Fact recall at each depth; refuses (QualityGateError) a prompt that cannot fit.
    ``limits`` as in `run_canaries`."""
    from servelab.prompts import server_token_counter

    lim = limits or GateLimits(timeout_s)
    cases = recall.depth_cases(lines, depths, where=f"profile {profile!r}")
    if context_len is not None:
        counter = server_token_counter(
            endpoint, timeout_s=min(lim.left_s(), lim.first_token_timeout_s or 60.0)
        )
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
    result = lim.run(endpoint, payloads, concurrency=1)
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
    first_token_timeout_s: float | None = None,
    deadline_s: float | None = None,
) -> GateReport:
    """All checks, in order. An input problem (QualityGateError) propagates: it is a
    configuration error, not a failed gate.

    ``timeout_s`` bounds each request, ``first_token_timeout_s`` (default: ``timeout_s``) its
    wait for a first token, ``deadline_s`` (default: none) the whole gate from now. A stuck
    server or a passed deadline stops the gate: the check under way fails with the reason,
    later checks say "not run" (see `GateLimits`)."""
    lim = GateLimits.starting_now(timeout_s, first_token_timeout_s, deadline_s)
    checks: list[CheckResult] = []
    names = ["canaries", "identity", "recall"]
    try:
        checks += run_canaries(
            endpoint,
            qset,
            repeats=repeats,
            identity_fraction=identity_fraction,
            timeout_s=timeout_s,
            limits=lim,
        )
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
                    limits=lim,
                )
            )
    except GateStopped as exc:
        stopped = names[len(checks)]
        checks.append(CheckResult(stopped, False, f"stopped: {exc}", (str(exc),)))
        checks += [
            CheckResult(n, False, f"not run: the gate stopped at {stopped}")
            for n in names[len(checks) :]
        ]
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
