"""Session-cache workload logic: session prompts, checks and figures on hand-made records."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from servelab import prometheus, recall
from servelab.client import RequestRecord
from servelab.engine_traits import TRAITS
from servelab.errors import QualityGateError
from servelab.quality import RecallStyle
from servelab.session_cache import (
    Pass,
    SessionCacheResult,
    build_sessions,
    labels,
    mechanism,
    reuses_cache,
    summary,
)

MS = 1_000_000


def rec(
    text: str,
    send: int,
    first: int,
    end: int,
    n: int = 8,
    error: str | None = None,
    cached: int | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=0,
        api="chat",
        arrival_ns=send,
        send_ns=send,
        first_token_ns=first,
        first_text_ns=first,
        end_ns=end,
        done_ns=end,
        chunk_ns=(first, end),
        chunk_tokens=(None, None),
        text=text,
        finish_reason="length",
        prompt_tokens=266,
        completion_tokens=n,
        cached_tokens=cached,
        requested_prompt_tokens=None,
        requested_output_tokens=n,
        status_code=200,
        error=error,
    )


def metrics(hits: float | None) -> prometheus.MetricsDelta:
    counters: dict[str, float | None] = {name: 0.0 for name in prometheus.COUNTERS}
    counters["vllm:prefix_cache_hits_total"] = hits
    if hits is None:  # an engine that exports no hit counters at all
        counters["vllm:external_prefix_cache_hits_total"] = None
    counters["vllm:prefix_cache_queries_total"] = 512.0
    return prometheus.MetricsDelta(counters, 0.0, 0.0)


CASES = tuple(recall.build_case(lane, 6, header=f"Session {lane} x") for lane in "BC")


def result(
    cold: tuple[RequestRecord, ...], warm: tuple[RequestRecord, ...], hits: float | None = 256.0
) -> SessionCacheResult:
    return SessionCacheResult(
        mechanism="prefix caching",
        labels=("B", "C"),
        cases=CASES,
        prompt_tokens=(266, 266),
        output_tokens=8,
        passes=(Pass(0, cold, metrics(0.0), ""), Pass(1, warm, metrics(hits), "")),
    )


GOOD_COLD = (rec(" cobalt. x", 0, 700 * MS, 1100 * MS), rec(" violet. y", 0, 900 * MS, 1300 * MS))
GOOD_WARM = (rec(" cobalt. x", 0, 100 * MS, 500 * MS), rec(" violet. y", 0, 150 * MS, 600 * MS))


def test_good_run_has_no_problems_and_right_figures() -> None:
    r = result(GOOD_COLD, GOOD_WARM)
    assert r.problems() == []
    assert r.cold_ttft_s == pytest.approx(0.8)
    assert r.reload_ttft_s == pytest.approx(0.125)
    assert r.reload_speedup == pytest.approx(6.4)
    warm = r.passes[1]
    # 16 tokens / slowest request (0.6 s); 16 / (0.6 - 0.1)
    assert r.wall_tok_s(warm) == pytest.approx(16 / 0.6)
    assert r.first_token_to_last_finish_tok_s(warm) == pytest.approx(16 / 0.5)
    s = summary(r)
    assert s["passes"][1]["observed"] == ["cobalt", "violet"]
    assert s["problems"] == [] and s["notes"] == []


def test_wrong_recall_on_a_reload_is_named() -> None:
    warm = (rec(" cobalts. x", 0, 100 * MS, 500 * MS), GOOD_WARM[1])
    problems = result(GOOD_COLD, warm).problems()
    assert any("session B reload pass 1" in p and "close but not exact" in p for p in problems)
    assert any("session B: output differs across passes" in p for p in problems)


def test_output_hash_must_match_across_passes() -> None:
    warm = (rec(" cobalt. z", 0, 100 * MS, 500 * MS), GOOD_WARM[1])
    problems = result(GOOD_COLD, warm).problems()
    assert problems == [
        "session B: output differs across passes (2 distinct SHA-256): [' cobalt. x', ' cobalt. z']"
    ]


def test_an_inexact_cache_notes_a_changed_output() -> None:
    """llama.cpp does not promise identical logits for a cached prefix (EngineTraits.
    cache_exact): a changed output there is a labeled note (recall: the next test)."""
    warm = (rec(" cobalt. z", 0, 100 * MS, 500 * MS), GOOD_WARM[1])
    r = dataclasses.replace(result(GOOD_COLD, warm), cache_exact=False)
    assert r.problems() == []
    assert r.notes() == [
        "session B: output differs across passes (2 distinct SHA-256): [' cobalt. x', "
        "' cobalt. z'] (not a failure: the engine does not promise identical logits for a "
        "cached prefix)"
    ]
    assert summary(r)["cache_exact"] is False
    assert TRAITS["llama.cpp"].cache_exact is False
    assert TRAITS["vllm"].cache_exact is True


def inexact(cold: tuple[Any, ...], warm: tuple[Any, ...]) -> Any:
    return dataclasses.replace(result(cold, warm), cache_exact=False)


def test_an_inexact_cache_notes_a_marginal_reload_miss_and_fails_the_rest() -> None:
    """On an engine without identical logits for a cached prefix, a reload answer that only
    the margin explains (right cold, no other session's word, the other session right in the
    same pass: what llama.cpp gave on an H100) is a labeled note; on vLLM the same answers
    fail. A miss the cache itself would explain still fails: both sessions wrong in a pass,
    an answer naming the other session's word, or a session wrong when cold too."""
    marginal = (rec(' "B-0005".', 0, 100 * MS, 500 * MS), GOOD_WARM[1])
    assert inexact(GOOD_COLD, marginal).problems() == []
    notes = inexact(GOOD_COLD, marginal).notes()
    assert any(
        n.startswith("session B reload pass 1: recall") and "got 'b'" in n and "not a failure" in n
        for n in notes
    ), notes
    exact = result(GOOD_COLD, marginal).problems()
    assert len(exact) == 2 and "expected 'cobalt', got 'b'" in exact[0]  # + differing output

    both = (rec(" cobalts. x", 0, 100 * MS, 500 * MS), rec(" red. y", 0, 150 * MS, 600 * MS))
    assert len(inexact(GOOD_COLD, both).problems()) == 2
    swapped = (rec(" violet. x", 0, 100 * MS, 500 * MS), GOOD_WARM[1])
    problems = inexact(GOOD_COLD, swapped).problems()
    assert len(problems) == 1 and "expected 'cobalt', got 'violet'" in problems[0]
    cold_wrong = (rec(" cobalts. x", 0, 700 * MS, 1100 * MS), GOOD_COLD[1])
    problems = inexact(cold_wrong, marginal).problems()
    assert [p.split(":")[0] for p in problems] == [
        "session B cold pass",
        "session B reload pass 1",
    ]


def test_reload_without_any_cache_hit_fails() -> None:
    problems = result(GOOD_COLD, GOOD_WARM, hits=0.0).problems()
    assert (
        len(problems) == 1 and "reload pass 1: no prefix-cache or KV-connector hit" in problems[0]
    )


def test_cache_evidence_falls_back_to_usage() -> None:
    warm = tuple(rec(r.text, 0, 100 * MS, 500 * MS, cached=0) for r in GOOD_WARM)
    r = result(GOOD_COLD, warm, hits=None)
    assert r.problems() == ["reload pass 1: usage reports 0 cached tokens"]


def test_failed_request_and_slow_reload_note() -> None:
    warm = (rec("", 0, 0, 0, error="timeout: no first token within 5 s"), GOOD_WARM[1])
    slow = (rec(" cobalt. x", 0, 2000 * MS, 2500 * MS), rec(" violet. y", 0, 2000 * MS, 2600 * MS))
    assert (
        "session B reload pass 1: request failed: timeout" in result(GOOD_COLD, warm).problems()[0]
    )
    r = result(GOOD_COLD, slow)
    assert r.problems() == []  # timing alone is noted, never failed
    assert r.notes() == ["reload TTFT 2.000 s was not below cold TTFT 0.800 s"]


def test_sessions_are_sized_unique_and_use_the_lanes() -> None:
    style = RecallStyle("chat", "The answer_word for lane {label} is", ("B", "C"))

    def count(prompt: Any) -> int:  # a fake tokenizer: 20 tokens per line plus a template
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return text.count("\n") * 20 + 40

    cases, sizes = build_sessions(2, 256, style, "salt-1", count)
    assert [c.label for c in cases] == ["B", "C"]
    assert all(s is not None and s >= 256 for s in sizes)
    fewer = [c.lines - 1 for c in cases]
    assert all(
        count(style.messages(recall.build_case(c.label, n, header=c.prompt.split("\n")[0]))) < 256
        for c, n in zip(cases, fewer, strict=True)
    )
    again, _ = build_sessions(2, 256, style, "salt-2", count)
    assert cases[0].prompt != again[0].prompt  # a new salt: the cold pass is cold
    assert cases[0].prompt.split("\n")[1:] == again[0].prompt.split("\n")[1:]


def test_labels() -> None:
    assert labels(3) == ("A", "B", "C")
    assert labels(2, ("B", "C", "D")) == ("B", "C")
    with pytest.raises(QualityGateError, match="names only 2 session_lanes"):
        labels(3, ("B", "C"))
    with pytest.raises(QualityGateError, match=r"1\.\.26"):
        labels(0)


def test_mechanism_from_cache_config() -> None:
    cpu = prometheus.parse(
        'vllm:cache_config_info{block_size="128",enable_prefix_caching="True",'
        'kv_offloading_size="None"} 1.0\n'
    )
    assert mechanism(cpu) == (
        "prefix caching in the engine's KV cache (no KV offload), block size 128"
    )
    assert reuses_cache(cpu) is True
    lab = prometheus.parse(
        'vllm:cache_config_info{block_size="256",enable_prefix_caching="False",'
        'kv_offloading_size="16",kv_offloading_backend="native"} 1.0\n'
    )
    assert mechanism(lab).startswith("KV offload to CPU memory (16 GiB, native backend)")
    assert reuses_cache(lab) is True
    off = prometheus.parse(
        'vllm:cache_config_info{enable_prefix_caching="False",kv_offloading_size="None"} 1\n'
    )
    assert reuses_cache(off) is False and mechanism(off).startswith("none")
    assert reuses_cache(None) is None


def test_a_long_stall_fails_the_pass() -> None:
    def page(running: int, waiting: int) -> prometheus.Samples:
        return prometheus.parse(
            f"vllm:num_requests_running {running}\nvllm:num_requests_waiting {waiting}\n"
        )

    stalled = prometheus.peaks_of([page(0, 2)] * 12, 0.5)  # 6 s waiting, none running
    blip = prometheus.peaks_of([page(0, 2), page(2, 0)] * 6, 0.5)
    base = result(GOOD_COLD, GOOD_WARM)
    for peaks, bad in ((stalled, True), (blip, False)):
        passes = (base.passes[0], Pass(1, GOOD_WARM, metrics(256.0), "", peaks))
        r = SessionCacheResult(
            base.mechanism, base.labels, base.cases, base.prompt_tokens, 8, passes
        )
        problems = r.problems()
        assert bool(problems) == bad, problems
        if bad:
            assert "requests waited with none running for 6.0 s" in problems[0]
