"""Multi-turn conversations (issue 17 item 5): seeded synthetic sessions whose every turn
sends the whole history plus a new user message, after a think delay.

Each of `sessions` conversations runs `turns` requests one after another on its own: turn 1
sends an opening context of `first_tokens` tokens and a user message; turn t sends turn t-1's
prompt, the answer the server gave to it, and a new user message of `user_tokens` tokens;
between an answer and the next turn the user thinks for `think_s`. The sessions run side by
side (closed loop per session, like AIPerf's multi-turn conversations), so a server with a
prefix cache serves each turn's history from it and its TTFT by turn index shows that.

``reuse=False`` puts a fresh salt at the head of every turn's prompt: the same lengths and
pattern with nothing to reuse, the control arm that shows what the cache is worth.

Timestamps only; metrics come afterwards (`servelab.metrics`, `turn_values`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from servelab import workloads
from servelab.client import RequestRecord, http_session, stream_completion
from servelab.errors import ClientError
from servelab.loadgen import (
    DEFAULT_MAX_LOOP_LAG_MS,
    RunResult,
    frozen_heap,
    lag_summary,
    watch_loop,
)
from servelab.server import Endpoint

#: How a turn's user message and the model's answer are laid out in the running transcript.
USER, ASSISTANT = "\nUser: ", "\nAssistant:"


@dataclass(frozen=True)
class Plan:
    """The shape of one run of conversations."""

    sessions: int
    turns: int
    first_tokens: int  # the opening context of turn 1 (a document, a system prompt)
    user_tokens: int  # each turn's new user message
    output_tokens: int
    think_s: float = 0.0  # from an answer's end to the next turn's send
    reuse: bool = True  # False: a fresh salt heads every turn's prompt (nothing shared)

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.turns < 1:
            raise ClientError(
                f"conversations: sessions and turns must be >= 1 (got {self.sessions}, "
                f"{self.turns}); set workloads.multiturn.sessions and turns"
            )
        if min(self.first_tokens, self.user_tokens, self.output_tokens) < 1 or self.think_s < 0:
            raise ClientError(
                "conversations: first_tokens, user_tokens and output_tokens must be >= 1 and "
                f"think_s >= 0 (got {self.first_tokens}, {self.user_tokens}, "
                f"{self.output_tokens}, {self.think_s}); fix workloads.multiturn"
            )

    def index(self, session: int, turn: int) -> int:
        """A turn's position in the run's records: sessions in order, turns within each."""
        return session * self.turns + turn

    def describe(self) -> str:
        return (
            f"{self.sessions} sessions x {self.turns} turns; opening context "
            f"{self.first_tokens} tokens, {self.user_tokens}-token user messages, "
            f"{self.output_tokens}-token answers, think {self.think_s:g} s between turns; "
            + (
                "history reused as each next prompt's prefix"
                if self.reuse
                else "control: a fresh salt heads every prompt (no prefix to reuse)"
            )
        )


def prompt_of(history: str, message: str, salt: str | None) -> str:
    """A turn's prompt: the history so far, the new user message, the answer's cue; with
    `salt`, headed by it so no earlier prompt shares a prefix."""
    head = "" if salt is None else f"[{salt}]\n"
    return f"{head}{history}{USER}{message}{ASSISTANT}"


async def _session(
    http: Any,
    endpoint: Endpoint,
    plan: Plan,
    session: int,
    messages: Sequence[str],
    body: Callable[[str], dict[str, Any]],
    timeout_s: float,
    first_token_timeout_s: float | None,
    nonce: str,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    history = ""
    for turn, message in enumerate(messages):
        if turn and plan.think_s:
            await asyncio.sleep(plan.think_s)
        salt = None if plan.reuse else f"s{session}t{turn}:{nonce}"
        prompt = prompt_of(history, message, salt)
        rec = await stream_completion(
            http,
            endpoint,
            body(prompt),
            timeout_s=timeout_s,
            first_token_timeout_s=first_token_timeout_s,
            index=plan.index(session, turn),
        )
        records.append(rec)
        if not rec.success:  # the user gives up: the rest of the session is not sent
            break
        history = prompt_of(history, message, None) + rec.text
    return records


async def run_async(
    endpoint: Endpoint,
    plan: Plan,
    messages: Sequence[Sequence[str]],
    body: Callable[[str], dict[str, Any]],
    *,
    timeout_s: float,
    first_token_timeout_s: float | None = None,
    nonce: str = "",
    max_loop_lag_ms: float = DEFAULT_MAX_LOOP_LAG_MS,
    keep_alive: bool = True,
) -> RunResult:
    """Run every session of `plan` side by side; `messages[s][t]` is session s's user
    message of turn t (the first one already carries the opening context) and `body(prompt)`
    the request body. A session whose turn failed sends no further turns; the records of
    the turns not sent are missing, and `turns_not_sent` says how many. ``keep_alive=False``:
    a connection per request (`servelab.engine_traits`, llama.cpp)."""
    if len(messages) != plan.sessions or any(len(m) != plan.turns for m in messages):
        raise ClientError(
            f"conversations: need {plan.sessions} sessions x {plan.turns} user messages"
        )
    samples: list[float] = []
    stop = asyncio.Event()
    with frozen_heap():  # no full collection walks the heap mid-run (loadgen.frozen_heap)
        async with http_session(keep_alive=keep_alive) as http:
            start = time.perf_counter_ns()
            cpu0 = time.process_time()
            watchdog = asyncio.create_task(watch_loop(5.0, samples, stop))
            try:
                per = await asyncio.gather(
                    *(
                        _session(
                            http,
                            endpoint,
                            plan,
                            s,
                            messages[s],
                            body,
                            timeout_s,
                            first_token_timeout_s,
                            nonce,
                        )
                        for s in range(plan.sessions)
                    )
                )
            finally:
                stop.set()
                await watchdog
            cpu = time.process_time() - cpu0
        end = time.perf_counter_ns()
    records = tuple(sorted((r for recs in per for r in recs), key=lambda r: r.index))
    lag = lag_summary(5.0, samples, cpu)
    return RunResult(
        records, start, end, plan.sessions, 1, (lag,), max_loop_lag_ms, expect_cached=plan.reuse
    )


def turns_not_sent(plan: Plan, run: RunResult) -> int:
    return plan.sessions * plan.turns - len(run.records)


def turn_of(plan: Plan, record: RequestRecord) -> int:
    """The turn index (0-based) of a record of this plan's run."""
    return record.index % plan.turns


def turn_values(
    plan: Plan, run: RunResult, read: Callable[[RequestRecord], float | None]
) -> list[list[float]]:
    """Per turn index, `read` of each session's successful record of that turn."""
    out: list[list[float]] = [[] for _ in range(plan.turns)]
    for r in run.records:
        if r.success and (v := read(r)) is not None:
            out[turn_of(plan, r)].append(v)
    return out


def measure(
    endpoint: Endpoint,
    *,
    plan: Plan,
    tag: str = "mt",
    warmup_requests: int = 1,
    settings: workloads.Settings | None = None,
    prompts: workloads.Prompts | None = None,
) -> RunResult:
    """One run of ``plan`` as a workload: fresh user messages (salted with
    ``tag``), every session side by side; the server's prefix-cache hit counter is read
    around it (`RunResult.server_cache_hits`)."""
    from servelab.engine_traits import traits_of

    s = settings or workloads.Settings()
    p = prompts or workloads.Prompts(endpoint, nonce=s.nonce)
    messages = [
        [
            p.make(plan.first_tokens if t == 0 else plan.user_tokens, f"{tag}-s{i}-t{t}", 1)[0]
            for t in range(plan.turns)
        ]
        for i in range(plan.sessions)
    ]
    workloads.warm_up(
        endpoint,
        p,
        requests=warmup_requests,
        prompt_tokens=plan.user_tokens,
        output_tokens=plan.output_tokens,
        settings=s,
    )

    def body(prompt: str) -> dict[str, Any]:
        return workloads.payloads(endpoint, [prompt], plan.output_tokens, s)[0]

    before = workloads.server_cache_hits(endpoint) if s.check_server_cache else None
    res = asyncio.run(
        run_async(
            endpoint,
            plan,
            messages,
            body,
            timeout_s=s.timeout_s,
            first_token_timeout_s=s.first_token_timeout_s,
            nonce=f"{tag}:{p.nonce}",
            max_loop_lag_ms=s.max_loop_lag_ms,
            keep_alive=traits_of(endpoint.profile).keep_alive,
        )
    )
    workloads.stop_if_stuck(endpoint, res, s)
    after = workloads.server_cache_hits(endpoint) if before is not None else None
    if before is not None and after is not None:
        res = dataclasses.replace(res, server_cache_hits=after - before)
    return res
