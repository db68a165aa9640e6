"""The session-cache workload: park several long sessions, reload them, and check that the
reload is both faster and exactly the same.

Modelled on the b70 lab's session-cache canary (``session_cache_canary.py``, c2 operations
smoke): sessions A, B, ... each get a long unique prefix (the lab's fact-word-v1 prompt, so
every session also carries a buried fact), all sessions are sent together (concurrency =
sessions) in a **cold** pass and then again in one or more **reload** passes. vLLM has no
session id: identity is the exact token prefix, so a reload pass resends the same prompt.

Checks (any failure is a problem, and the perf test fails):
- every request succeeded;
- recall is right in every session on every pass (first word = the lane's word);
- the output of each session is byte-identical across passes (SHA-256);
- where the engine does not promise identical logits for a cached prefix
  (`EngineTraits.cache_exact`, llama.cpp), a changed output is a note, and so is a reload
  pass's recall miss that only numerics at a marginal answer can explain (`_margin_miss`):
  the session recalled right when cold, its answer names no other session's fact, and
  another session of the same pass recalled right. A miss beside no right answer, or one
  naming another session's fact (the cache served the wrong prefix), still fails;
- a reload pass was served from a cache: the engine's prefix-cache (or KV-connector) hit
  counters rose (``/metrics``), or the usage reports cached tokens.

Reload TTFT against cold TTFT is a figure (judged against its baseline); a reload that was
not faster is noted, not failed, because one pass on a shared machine is too noisy to judge.

Figures: cold and reload TTFT (the lab's TTFT: first non-empty text), their ratio, and the
lab's two sustained-decode rates per pass: ``wall tok/s`` = generated tokens / elapsed of the
slowest request, and first-token-to-last-finish = generated tokens / (last finish - first
streamed text in the pass).

Which cache serves the reload depends on the engine: the lab's MiniMax c2/c4/c8 park blocks in
CPU memory through vLLM's OffloadingConnector (``--kv-offloading-size``) with prefix caching
off; Gemma c8 and vLLM's CPU build (the embedded default) use prefix caching, whose blocks
stay in the engine's own KV cache (the CPU build has no KV offload). `mechanism` reads the
engine's ``vllm:cache_config_info`` and says which.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from servelab import prometheus, recall
from servelab.client import RequestRecord, chat_payload, completion_payload
from servelab.errors import ClientError, QualityGateError
from servelab.loadgen import run_requests
from servelab.quality import RecallStyle
from servelab.server import Endpoint

#: Requests waiting while none run for this long make a pass invalid (metrics.md 6: run
#: health); shorter blips are the scheduler picking requests up.
STALL_S = 5.0
#: Counts tokens of a prompt (str) or chat messages, as the server will (prompts.TokenCounter).
Counter = Callable[[Any], int]


@dataclass(frozen=True)
class Pass:
    index: int  # 0 = cold
    records: tuple[RequestRecord, ...]  # one per session, in label order
    metrics: prometheus.MetricsDelta | None
    metrics_note: str  # why metrics are missing ("" when present)
    peaks: prometheus.Peaks | None = None  # sampled while the pass ran


@dataclass(frozen=True)
class SessionCacheResult:
    mechanism: str
    labels: tuple[str, ...]
    cases: tuple[recall.RecallCase, ...]
    prompt_tokens: tuple[int | None, ...]
    output_tokens: int
    passes: tuple[Pass, ...]
    # The engine promises a cached prefix gives the same output as a fresh one
    # (`EngineTraits.cache_exact`); where not, outputs that differ across passes are a note.
    cache_exact: bool = True

    # ---------------------------------------------------------------- figures
    def ttft_s(self, p: Pass) -> list[float]:
        return [
            (r.first_text_ns - r.send_ns) / 1e9
            for r in p.records
            if r.success and r.first_text_ns is not None
        ]

    @property
    def cold_ttft_s(self) -> float | None:
        t = self.ttft_s(self.passes[0])
        return statistics.median(t) if t else None

    @property
    def reload_ttft_s(self) -> float | None:
        t = [x for p in self.passes[1:] for x in self.ttft_s(p)]
        return statistics.median(t) if t else None

    @property
    def reload_speedup(self) -> float | None:
        c, r = self.cold_ttft_s, self.reload_ttft_s
        return None if c is None or r is None or r <= 0 else c / r

    @staticmethod
    def wall_tok_s(p: Pass) -> float | None:
        """The lab's sustained ``wall tok/s``: generated / elapsed of the slowest request."""
        ok = [r for r in p.records if r.success and r.end_ns is not None]
        gen = sum(r.output_tokens or 0 for r in ok)
        slowest = max(((r.end_ns or 0) - r.send_ns for r in ok), default=0) / 1e9
        return gen / slowest if ok and slowest > 0 and gen else None

    @staticmethod
    def first_token_to_last_finish_tok_s(p: Pass) -> float | None:
        ok = [r for r in p.records if r.success and r.end_ns and r.first_text_ns]
        if not ok:
            return None
        gen = sum(r.output_tokens or 0 for r in ok)
        span = (max(r.end_ns or 0 for r in ok) - min(r.first_text_ns or 0 for r in ok)) / 1e9
        return gen / span if span > 0 and gen else None

    # ---------------------------------------------------------------- checks
    def problems(self) -> list[str]:
        out: list[str] = []
        for p in self.passes:
            name = "cold pass" if p.index == 0 else f"reload pass {p.index}"
            for case, rec in zip(self.cases, p.records, strict=True):
                if not rec.success:
                    out.append(f"session {case.label} {name}: request failed: {rec.error}")
                    continue
                ans = recall.check_answer(case, rec.text)
                if not ans.ok and not self._margin_miss(p, case):
                    out.append(f"session {case.label} {name}: {ans.problem}")
            if p.index > 0:
                out += self._cache_evidence(p, name)
            if p.peaks is not None and p.peaks.longest_stall_s >= STALL_S:
                out.append(
                    f"{name}: requests waited with none running for "
                    f"{p.peaks.longest_stall_s:.1f} s ({p.peaks.describe()})"
                )
        if self.cache_exact:
            out += self.differing_outputs()
        return out

    def _right(self, p: Pass, case: recall.RecallCase) -> bool:
        rec = p.records[self.cases.index(case)]
        return rec.success and recall.check_answer(case, rec.text).ok

    def _margin_miss(self, p: Pass, case: recall.RecallCase) -> bool:
        """A reload pass's recall miss on an engine without identical logits for a cached
        prefix that only the margin explains: the session was right cold, another session
        of this pass is right, and the answer names no other session's word. On an H100
        (llama.cpp, SmolLM2-135M Q4_1, 1024-token prefixes, 2026-12-06 and 2026-12-07) one
        reload answer of 6 read lane C's row id where the cold pass read its word."""
        if self.cache_exact or p.index == 0 or not self._right(self.passes[0], case):
            return False
        others = [c for c in self.cases if c is not case]
        text = p.records[self.cases.index(case)].text.lower()
        if any(c.expected.lower() in text for c in others):
            return False
        return any(self._right(p, c) for c in others)

    def margin_misses(self) -> list[str]:
        """The reload misses `_margin_miss` turned into notes, with the answer given."""
        out = []
        for p in self.passes[1:]:
            for case, rec in zip(self.cases, p.records, strict=True):
                if rec.success and not self._right(p, case) and self._margin_miss(p, case):
                    problem = recall.check_answer(case, rec.text).problem
                    out.append(f"session {case.label} reload pass {p.index}: {problem}")
        return out

    def differing_outputs(self) -> list[str]:
        """Sessions whose output changed between passes, with every pass's text."""
        out: list[str] = []
        for k, case in enumerate(self.cases):
            hashes = {p.records[k].output_sha256 for p in self.passes if p.records[k].success}
            if len(hashes) > 1:
                texts = [p.records[k].text for p in self.passes]
                out.append(
                    f"session {case.label}: output differs across passes ({len(hashes)} "
                    f"distinct SHA-256): {texts!r}"
                )
        return out

    def notes(self) -> list[str]:
        """Observations that are not failures: timing on a shared machine is noisy, so a slow
        reload is judged by the reload-TTFT figure against its baseline, not here."""
        out: list[str] = []
        cold, warm = self.cold_ttft_s, self.reload_ttft_s
        if cold is not None and warm is not None and warm >= cold:
            out.append(f"reload TTFT {warm:.3f} s was not below cold TTFT {cold:.3f} s")
        for p in self.passes:
            if p.metrics is None:
                out.append(f"pass {p.index}: engine metrics not recorded ({p.metrics_note})")
        if not self.cache_exact:
            out += [
                f"{d} (not a failure: the engine does not promise identical logits for a "
                "cached prefix)"
                for d in self.differing_outputs()
            ]
            out += [
                f"{m} (not a failure: right when cold, no other session's fact, another "
                "session right in the same pass; the engine does not promise identical "
                "logits for a cached prefix)"
                for m in self.margin_misses()
            ]
        return out

    def _cache_evidence(self, p: Pass, name: str) -> list[str]:
        if p.metrics is not None:
            hits = [
                p.metrics.get("vllm:prefix_cache_hits_total"),
                p.metrics.get("vllm:external_prefix_cache_hits_total"),
            ]
            known = [h for h in hits if h is not None]
            if known:
                return (
                    []
                    if sum(known) > 0
                    else [
                        f"{name}: no prefix-cache or KV-connector hit recorded by the engine "
                        f"({p.metrics.describe()})"
                    ]
                )
        cached = [r.cached_tokens for r in p.records if r.cached_tokens is not None]
        if cached:
            return [] if sum(cached) > 0 else [f"{name}: usage reports 0 cached tokens"]
        return []  # not observable here: the TTFT check still applies


def mechanism(samples: prometheus.Samples | None) -> str:
    """What serves a reload, from ``vllm:cache_config_info``."""
    if _llamacpp(samples):
        return (
            "llama.cpp slot prompt cache: a prompt reuses the longest common prefix of a "
            "slot's cached tokens (cache_prompt, on by default; measured requests turn it off)"
        )
    info = None if samples is None else prometheus.labels_of(samples, prometheus.CACHE_CONFIG)
    if info is None:
        return "unknown (the engine exports no vllm:cache_config_info)"
    offload = info.get("kv_offloading_size", "None")
    prefix = info.get("enable_prefix_caching") == "True"
    block = info.get("block_size", "?")
    if offload not in ("None", "", "0"):
        return (
            f"KV offload to CPU memory ({offload} GiB, {info.get('kv_offloading_backend', '?')} "
            f"backend), prefix caching {'on' if prefix else 'off'}, block size {block}"
        )
    if prefix:
        return f"prefix caching in the engine's KV cache (no KV offload), block size {block}"
    return "none: the engine has neither KV offload nor prefix caching"


def reuses_cache(samples: prometheus.Samples | None) -> bool | None:
    """Whether the engine can serve a reload from a cache (None: cannot tell)."""
    if _llamacpp(samples):
        return True
    info = None if samples is None else prometheus.labels_of(samples, prometheus.CACHE_CONFIG)
    if info is None:
        return None
    offload = info.get("kv_offloading_size", "None") not in ("None", "", "0")
    return offload or info.get("enable_prefix_caching") == "True"


def _llamacpp(samples: prometheus.Samples | None) -> bool:
    return samples is not None and any(n.startswith("llamacpp:") for n, _ in samples)


def labels(n: int, lanes: Sequence[str] = ()) -> tuple[str, ...]:
    """Session labels: the quality file's ``session_lanes`` if given, else A, B, C, ..."""
    if lanes:
        if n > len(lanes):
            raise QualityGateError(
                f"session cache: {n} sessions but the quality file names only "
                f"{len(lanes)} session_lanes {list(lanes)}"
            )
        return tuple(lanes[:n])
    if not 1 <= n <= 26:
        raise QualityGateError(f"session cache: sessions must be 1..26 (got {n})")
    return tuple(chr(ord("A") + i) for i in range(n))


def build_sessions(
    n: int, prefix_tokens: int, style: RecallStyle, salt: str, count: Counter | None
) -> tuple[list[recall.RecallCase], list[int | None]]:
    """One fact-word prompt per session, at least ``prefix_tokens`` long as the server counts
    (estimated when it cannot count). The salted first line keeps the cold pass cold."""
    cases: list[recall.RecallCase] = []
    sizes: list[int | None] = []
    tag = hashlib.sha256(salt.encode("utf-8")).hexdigest()[:12]
    for label in labels(n, style.session_lanes):
        header = f"Session {label} cache check {tag}"

        def size(lines: int, label: str = label, header: str = header) -> int:
            case = recall.build_case(label, lines, header=header)
            if count is None:
                return recall.estimated_tokens(lines)
            return count(_prompt_of(style, case))

        lines = max(4, recall.max_lines_for(prefix_tokens, 0) // 2)
        got = size(lines)
        for _ in range(40):
            if got >= prefix_tokens:
                break
            per_line = max(1.0, got / lines)
            lines += max(1, int((prefix_tokens - got) / per_line))
            got = size(lines)
        while lines > 4 and size(lines - 1) >= prefix_tokens:
            lines -= 1
            got = size(lines)
        cases.append(recall.build_case(label, lines, header=header))
        sizes.append(got if count is not None else None)
    return cases, sizes


def _prompt_of(style: RecallStyle, case: recall.RecallCase) -> Any:
    return case.prompt if style.api == "completion" else style.messages(case)


def _payload(model: str, style: RecallStyle, case: recall.RecallCase, output_tokens: int) -> Any:
    # Forced length (ignore_eos) so the sustained-decode rates count the same tokens every
    # pass; the answer is still the first word.
    if style.api == "completion":
        return completion_payload(model, case.prompt, output_tokens, token_ids=False)
    extra = (
        {"add_generation_prompt": False, "continue_final_message": True} if style.lead_in else {}
    )
    return chat_payload(model, style.messages(case), output_tokens, token_ids=False, extra=extra)


def _scrape(endpoint: Endpoint) -> tuple[prometheus.Samples | None, str]:
    try:
        return prometheus.scrape(endpoint.base_url, endpoint.headers), ""
    except ClientError as exc:
        return None, str(exc)


def run_session_cache(
    endpoint: Endpoint,
    *,
    sessions: int,
    prefix_tokens: int,
    output_tokens: int,
    passes: int,
    style: RecallStyle,
    salt: str,
    count: Counter | None = None,
    timeout_s: float = 600.0,
    context_len: int | None = None,
    profile: str = "endpoint",
    cache_exact: bool = True,
) -> SessionCacheResult:
    if passes < 2:
        raise QualityGateError(
            f"profile {profile!r}: workloads.session_cache.passes must be >= 2 (a cold pass "
            f"and at least one reload), got {passes}"
        )
    cases, sizes = build_sessions(sessions, prefix_tokens, style, salt, count)
    if context_len is not None:
        for case, n in zip(cases, sizes, strict=True):
            if n is not None:
                recall.check_fits(
                    prompt_tokens=n,
                    max_tokens=output_tokens,
                    context_len=context_len,
                    profile=profile,
                    case=f"session {case.label} ({case.lines} lines)",
                )
    payloads = [_payload(endpoint.model, style, c, output_tokens) for c in cases]
    first, note = _scrape(endpoint)
    done: list[Pass] = []
    before = first
    for k in range(passes):
        peaks: prometheus.Peaks | None = None
        if first is not None:
            with prometheus.Sampler(endpoint.base_url, endpoint.headers) as sampler:
                res = run_requests(
                    endpoint, payloads, concurrency=sessions, timeout_s=timeout_s, progress=False
                )
            peaks = sampler.peaks()
        else:
            res = run_requests(
                endpoint, payloads, concurrency=sessions, timeout_s=timeout_s, progress=False
            )
        after, note = _scrape(endpoint)
        delta: prometheus.MetricsDelta | None = None
        if before is not None and after is not None:
            try:
                delta = prometheus.delta(before, after)
            except ClientError as exc:
                note = str(exc)
        done.append(Pass(k, res.records, delta, "" if delta else note or "no /metrics", peaks))
        before = after
    return SessionCacheResult(
        mechanism=mechanism(first),
        labels=tuple(c.label for c in cases),
        cases=tuple(cases),
        prompt_tokens=tuple(sizes),
        output_tokens=output_tokens,
        passes=tuple(done),
        cache_exact=cache_exact,
    )


def summary(result: SessionCacheResult) -> dict[str, Any]:
    """A JSON-able summary for the record (hashes, TTFTs, rates, problems)."""

    def f(v: float | None) -> float | None:
        return None if v is None else round(v, 6)

    return {
        "mechanism": result.mechanism,
        "prompt_version": recall.PROMPT_VERSION,
        "sessions": list(result.labels),
        "lines": [c.lines for c in result.cases],
        "prompt_tokens": list(result.prompt_tokens),
        "output_tokens": result.output_tokens,
        "cold_ttft_s": f(result.cold_ttft_s),
        "reload_ttft_s": f(result.reload_ttft_s),
        "reload_speedup": f(result.reload_speedup),
        "passes": [
            {
                "pass": p.index,
                "ttft_s": [f(t) for t in result.ttft_s(p)],
                "output_sha256": [r.output_sha256 for r in p.records],
                "observed": [recall.first_word(r.text) for r in p.records],
                "wall_tok_s": f(result.wall_tok_s(p)),
                "first_token_to_last_finish_tok_s": f(result.first_token_to_last_finish_tok_s(p)),
                "metrics": None if p.metrics is None else p.metrics.describe(),
                "peaks": None if p.peaks is None else p.peaks.describe(),
                "metrics_note": p.metrics_note,
            }
            for p in result.passes
        ],
        "cache_exact": result.cache_exact,
        "problems": result.problems(),
        "notes": result.notes(),
    }
