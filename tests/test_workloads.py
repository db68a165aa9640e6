"""Arrival schedules (pure) and workloads driven against a local stand-in server.

The stand-in streams well-formed OpenAI chunks with a fixed pause per token; the point is
the workloads' own logic (warm-up excluded, distinct prompts, levels, schedules, windows),
not any engine's speed, so no figure is taken from it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from servelab import arrivals, client, metrics, workloads
from servelab.errors import ClientError, ConfigError
from servelab.server import Endpoint
from tests.fakes.sse import ThreadedAsyncServer

# --------------------------------------------------------------------------- arrivals


def test_poisson_schedule_is_seeded_and_normalized() -> None:
    a = arrivals.schedule(200, 10.0, seed=1)
    b = arrivals.schedule(200, 10.0, rng=np.random.default_rng(1))
    assert a.offsets_s == b.offsets_s
    assert a.offsets_s != arrivals.schedule(200, 10.0, seed=2).offsets_s
    assert a.span_s == pytest.approx(200 / 10.0)  # vLLM's rescaling: last arrival at N/rate
    assert all(x < y for x, y in zip(a.offsets_s, a.offsets_s[1:], strict=False))


def test_gamma_burstiness_changes_spread_not_mean() -> None:
    def cv(k: float) -> float:
        gaps = np.diff((0.0, *arrivals.schedule(4000, 5.0, burstiness=k, seed=3).offsets_s))
        assert gaps.mean() == pytest.approx(1 / 5.0, rel=1e-9)
        return float(gaps.std() / gaps.mean())

    # Gamma(k) gaps have coefficient of variation 1/sqrt(k).
    assert cv(1.0) == pytest.approx(1.0, rel=0.1)
    assert cv(0.25) == pytest.approx(2.0, rel=0.1)
    assert cv(4.0) == pytest.approx(0.5, rel=0.1)
    assert arrivals.schedule(3, 2.0, burstiness=math.inf).offsets_s == (0.5, 1.0, 1.5)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrivals.schedule(4, math.inf).offsets_s == (0.0, 0.0, 0.0, 0.0)


def test_ramp_up_rates() -> None:
    lin = arrivals.schedule(5, 0, ramp="linear", start_rps=1, end_rps=5, burstiness=math.inf)
    assert lin.rates_rps == (1, 2, 3, 4, 5)
    assert lin.offsets_s == pytest.approx(np.cumsum([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    exp = arrivals.schedule(3, 0, ramp="exponential", start_rps=1, end_rps=4, seed=0)
    assert exp.rates_rps == pytest.approx((1, 2, 4))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n": 0, "rate_rps": 1.0}, "n must be"),
        ({"n": 3, "rate_rps": 0.0}, "rate must be"),
        ({"n": 3, "rate_rps": 1.0, "burstiness": 0.0}, "burstiness"),
        ({"n": 3, "rate_rps": 1.0, "ramp": "linear"}, "needs positive"),
    ],
)
def test_schedule_rejects_bad_input(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        arrivals.schedule(**kw)


# --------------------------------------------------------------------------- workloads


class StandIn(ThreadedAsyncServer):
    """HTTP/1.1 server on localhost: /v1/completions streams ``max_tokens`` chunks,
    ``token_pause_s`` apart; it remembers every prompt it was sent."""

    def __init__(self, token_pause_s: float = 0.002) -> None:
        super().__init__()
        self.pause = token_pause_s
        self.prompts: list[str] = []

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = next(
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length:")
                )
                body = json.loads(await r.readexactly(n))
                if not head.startswith(b"POST /v1/completions "):
                    w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    await w.drain()
                    continue
                self.prompts.append(body["prompt"])
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                k = int(body["max_tokens"])
                for i in range(k):
                    ev = {"choices": [{"index": 0, "text": f" w{i}", "token_ids": [i]}]}
                    data = b"data: " + json.dumps(ev).encode() + b"\n\n"
                    w.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await w.drain()
                    await asyncio.sleep(self.pause)
                tail = (
                    b"data: "
                    + json.dumps(
                        {
                            "choices": [],
                            "usage": {
                                "prompt_tokens": len(body["prompt"].split()),
                                "completion_tokens": k,
                            },
                        }
                    ).encode()
                    + b"\n\ndata: [DONE]\n\n"
                )
                w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


def words(p: str | Sequence[Mapping[str, str]]) -> int:
    assert isinstance(p, str)
    return len(p.split())


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


def setup(s: StandIn) -> tuple[Endpoint, workloads.Prompts, workloads.Settings]:
    ep = Endpoint(base_url=f"http://127.0.0.1:{s.port}", model="m")
    return ep, workloads.Prompts(ep, count=words, nonce="t"), workloads.Settings(progress=False)


def test_decode_warms_up_with_distinct_prompts(stand_in: StandIn) -> None:
    ep, p, st = setup(stand_in)
    before = len(stand_in.prompts)
    runs = workloads.decode(
        ep, prompt_tokens=12, output_tokens=5, runs=3, warmup_requests=2, settings=st, prompts=p
    )
    sent = stand_in.prompts[before:]
    assert len(runs) == 3 and len(sent) == 5  # 2 warm-ups + 3 measured, warm-ups first
    warm, measured = sent[:2], sent[2:]
    assert len(set(sent)) == 5
    # No measured prompt starts like a warm-up prompt (so no prefix-cache block is shared).
    assert {tuple(w.split()[:4]) for w in warm}.isdisjoint(tuple(m.split()[:4]) for m in measured)
    assert all(len(x.split()) == 12 for x in sent)
    assert [r.records[0].text for r in runs] == [" w0 w1 w2 w3 w4"] * 3
    for r in runs:
        assert len(r.records) == 1 and r.invalid_reasons() == []
        m = metrics.compute(r.records, r.start_ns, r.end_ns)
        assert m.decode_tok_s is not None and m.decode_tok_s.median > 0


def test_prefill_ladder_lengths(stand_in: StandIn) -> None:
    ep, p, st = setup(stand_in)
    res = workloads.prefill_ladder(
        ep, prompt_lengths=[4, 9], output_tokens=1, requests_per_length=2, settings=st, prompts=p
    )
    assert sorted(res) == [4, 9]
    for n, run in res.items():
        assert [r.prompt_tokens for r in run.records] == [n, n]
        assert [r.requested_prompt_tokens for r in run.records] == [n, n]


def test_concurrency_sweep_reaches_each_level(stand_in: StandIn) -> None:
    ep, p, st = setup(stand_in)
    res = workloads.concurrency_sweep(
        ep, levels=[1, 3], prompt_tokens=6, output_tokens=20, settings=st, prompts=p
    )
    for c, run in res.items():
        assert len(run.records) == 2 * c and run.concurrency == c
        m = metrics.compute(run.records, run.start_ns, run.end_ns)
        assert m.peak_concurrency == c
    with pytest.raises(ClientError, match="levels"):
        workloads.concurrency_sweep(ep, levels=[0], prompt_tokens=6, output_tokens=2, prompts=p)


def test_open_loop_follows_schedule(stand_in: StandIn) -> None:
    ep, p, st = setup(stand_in)
    sched = arrivals.schedule(4, 20.0, seed=0)
    run = workloads.open_loop(
        ep, schedule=sched, prompt_tokens=5, output_tokens=2, settings=st, prompts=p
    )
    got = [(r.arrival_ns - run.start_ns) / 1e9 for r in run.records]
    assert got == pytest.approx(list(sched.offsets_s), abs=0.03)


def test_sustained_decode_window(stand_in: StandIn) -> None:
    ep, p, st = setup(stand_in)
    out = workloads.sustained_decode(
        ep, concurrency=2, prompt_tokens=5, output_tokens=30, requests=4, settings=st, prompts=p
    )
    assert out.window_ns is not None and out.window_ns[1] > out.window_ns[0]
    assert out.steady_output_tok_s is not None and out.steady_output_tok_s > 0


def test_prompts_are_unique_across_nonces(stand_in: StandIn) -> None:
    ep, _, _ = setup(stand_in)
    a = workloads.Prompts(ep, count=words, nonce="1").make(16, "decode", 3)
    b = workloads.Prompts(ep, count=words, nonce="2").make(16, "decode", 3)
    assert not set(a) & set(b)


class MetricsPage:
    """A localhost server whose GET /metrics answers ``page`` (settable between requests)."""

    def __init__(self) -> None:
        self.page = ""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = owner.page.encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MetricsPage:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def test_server_cache_hits() -> None:
    with MetricsPage() as m:
        ep = Endpoint(base_url=f"http://127.0.0.1:{m.httpd.server_address[1]}/", model="m")
        m.page = (
            "# HELP vllm:prefix_cache_hits_total hits\n"
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 16.0\n'
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 4.0\n'
            'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e+09\n'
        )
        assert workloads.server_cache_hits(ep) == 20.0  # summed over engines
        m.page = "other_metric 3\n"
        assert workloads.server_cache_hits(ep) is None  # not exported
        m.page = "<html>not metrics</html>\n"
        assert workloads.server_cache_hits(ep) is None  # not a Prometheus page
    unreachable = Endpoint(base_url="http://127.0.0.1:9", model="m")
    assert workloads.server_cache_hits(unreachable, timeout_s=1.0) is None


def test_prompts_fall_back_to_the_model_tokenizer(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in has no /tokenize: with a model folder the local tokenizer counts."""
    from servelab import prompts as prompts_mod

    seen: list[str] = []

    def fake_hf(model_dir: str) -> prompts_mod.TokenCounter:
        seen.append(model_dir)
        return words

    monkeypatch.setattr(prompts_mod, "hf_token_counter", fake_hf)
    ep = Endpoint(base_url=f"http://127.0.0.1:{stand_in.port}", model="m")
    p = workloads.Prompts(ep, nonce="f", model_dir="/models/x")
    assert seen == ["/models/x"]
    assert [len(t.split()) for t in p.make(7, "fb", 2)] == [7, 7]
    with pytest.raises(ClientError, match="tokenize"):
        workloads.Prompts(ep, nonce="f").make(7, "fb", 1)


class _Limits:
    """A profile's ``limits`` with the fields servelab reads (see profiles.Limits)."""

    request_timeout_s = 300.0
    first_token_timeout_s: float | None = 45.0
    test_timeout_s: float | None = 100.0


def test_settings_follow_the_profile_limits_and_the_command_line() -> None:
    lim = _Limits()
    s = workloads.Settings.for_limits(lim, progress=False)
    assert (s.timeout_s, s.first_token_timeout_s, s.progress) == (300.0, 45.0, False)
    assert s.deadline_ns is not None
    assert 99 < (s.deadline_ns - time.perf_counter_ns()) / 1e9 <= 100
    # --request-timeout caps the first-token wait as well
    s = workloads.Settings.for_limits(lim, request_timeout_s=20)
    assert (s.timeout_s, s.first_token_timeout_s) == (20.0, 20.0)
    s = workloads.Settings.for_limits(lim, first_token_timeout_s=5, test_timeout_s=None)
    assert (s.timeout_s, s.first_token_timeout_s) == (300.0, 5.0)
    lim.first_token_timeout_s = lim.test_timeout_s = None
    s = workloads.Settings.for_limits(lim)
    assert (s.timeout_s, s.first_token_timeout_s, s.deadline_ns) == (300.0, None, None)
    assert workloads.request_timeouts(None) == (client.DEFAULT_TIMEOUT_S, None)


# --------------------------------------------------------------------------- issue 17 (H5)


def test_multi_turn_sends_the_whole_history_each_turn(stand_in: StandIn) -> None:
    """Issue 17 item 5: turn t's prompt is turn t-1's prompt, its answer and a new message;
    turns of a session wait for the answer and the think delay; sessions run side by side."""
    from servelab import conversations

    ep, p, s = setup(stand_in)
    plan = conversations.Plan(
        sessions=2, turns=3, first_tokens=12, user_tokens=5, output_tokens=3, think_s=0.05
    )
    stand_in.prompts.clear()
    res = conversations.measure(ep, plan=plan, tag="h", warmup_requests=0, settings=s, prompts=p)
    assert [r.index for r in res.records] == list(range(6)) and res.expect_cached
    assert conversations.turns_not_sent(plan, res) == 0
    for session in range(2):
        recs = res.records[session * 3 : session * 3 + 3]
        for prev, cur in itertools.pairwise(recs):
            assert cur.send_ns >= (prev.end_ns or 0) + 45_000_000  # the 50 ms think delay
    by_session: dict[str, list[str]] = {}
    for x in stand_in.prompts:
        assert isinstance(x, str)
        by_session.setdefault(x.split(conversations.USER)[1][:12], []).append(x)
    assert len(by_session) == 2
    for prompts in by_session.values():
        first, second, third = sorted(prompts, key=len)
        assert second.startswith(first + " w0 w1 w2" + conversations.USER)
        assert third.startswith(second + " w0 w1 w2" + conversations.USER)
    assert [len(v) for v in conversations.turn_values(plan, res, lambda r: 1.0)] == [2, 2, 2]


def test_multi_turn_control_arm_shares_no_prefix(stand_in: StandIn) -> None:
    from servelab import conversations

    ep, p, s = setup(stand_in)
    plan = conversations.Plan(
        sessions=1, turns=3, first_tokens=8, user_tokens=4, output_tokens=2, reuse=False
    )
    stand_in.prompts.clear()
    res = conversations.measure(ep, plan=plan, tag="c", warmup_requests=0, settings=s, prompts=p)
    assert not res.expect_cached and len(res.records) == 3
    heads = [x.split("\n")[0] for x in stand_in.prompts if isinstance(x, str)]
    assert len(set(heads)) == 3 and all(h.startswith("[s0t") for h in heads)


def test_conversation_plan_is_checked() -> None:
    from servelab import conversations

    with pytest.raises(ClientError, match="sessions and turns must be >= 1"):
        conversations.Plan(sessions=0, turns=2, first_tokens=4, user_tokens=2, output_tokens=1)
    with pytest.raises(ClientError, match="think_s >= 0"):
        conversations.Plan(
            sessions=1, turns=2, first_tokens=4, user_tokens=2, output_tokens=1, think_s=-1
        )


def test_cancel_plan_is_seeded_and_checked() -> None:
    a = workloads.cancel_plan(10, 0.3, 2, seed=1)
    assert a == workloads.cancel_plan(10, 0.3, 2, seed=1)
    assert sum(k is not None for k in a) == 3 and set(a) == {None, 2}
    assert workloads.cancel_plan(10, 0.3, 2, seed=2) != a
    with pytest.raises(ClientError, match="share must be within"):
        workloads.cancel_plan(4, 1.5, 2)
    with pytest.raises(ClientError, match="after_chunks >= 1"):
        workloads.cancel_plan(4, 0.5, 0)


def test_cancellation_closes_the_planned_streams(stand_in: StandIn) -> None:
    ep, p, s = setup(stand_in)
    plan = workloads.cancel_plan(6, 0.5, 2, seed=0)
    res = workloads.cancellation(
        ep,
        requests=6,
        concurrency=3,
        prompt_tokens=8,
        output_tokens=6,
        cancel_after=plan,
        warmup_requests=0,
        settings=s,
        prompts=p,
    )
    assert [r.cancelled for r in res.records] == [k is not None for k in plan]
    assert all(len(r.chunk_ns) == 2 for r in res.cancelled)
    assert res.invalid_reasons() == [] and len(res.survivors().records) == 3
