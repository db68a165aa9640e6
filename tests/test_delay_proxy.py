"""The delaying proxy (servelab.delay_proxy): the A/B and live-verdict stand-in for a slower
engine. Against the scripted stand-in (exact inter-token intervals), every token after the
first arrives `delay_s` later than straight from the server, the delay does not compound
over a long response, the bytes are unchanged and kept-alive connections keep working."""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest

from servelab.client import completion_payload
from servelab.delay_proxy import DelayingProxy, DelayProxyError, delayed
from servelab.loadgen import RunResult, run_requests
from servelab.server import Endpoint
from tests.fakes.scripted_server import ScriptedServer

ITL_S, DELAY_S, TOKENS = 0.010, 0.020, 20


@pytest.fixture(scope="module")
def server() -> Iterator[Endpoint]:
    with ScriptedServer(0.020, ITL_S) as s:
        yield Endpoint(base_url=f"http://127.0.0.1:{s.port}", model="scripted")


def run(endpoint: Endpoint, n: int = 1) -> RunResult:
    payloads = [completion_payload(endpoint.model, f"hello {i}", TOKENS) for i in range(n)]
    res = run_requests(endpoint, payloads, concurrency=1, progress=False, timeout_s=30)
    assert all(r.success for r in res.records), [r.error for r in res.records]
    return res


def gaps_ms(res: RunResult) -> list[float]:
    out: list[float] = []
    for r in res.records:
        out += [(b - a) / 1e6 for a, b in zip(r.chunk_ns, r.chunk_ns[1:], strict=False)]
    return out


def test_every_token_after_the_first_is_delayed_and_the_delay_does_not_compound(
    server: Endpoint,
) -> None:
    direct = run(server)
    with delayed(server, DELAY_S) as slow:
        assert slow.base_url != server.base_url and slow.model == server.model
        proxied = run(slow)
    (d,), (p,) = direct.records, proxied.records
    assert len(p.chunk_ns) == len(d.chunk_ns) == TOKENS
    assert p.text == d.text and p.completion_tokens == d.completion_tokens == TOKENS
    assert p.finish_reason == d.finish_reason
    gaps = gaps_ms(proxied)
    # Each gap is the server's 10 ms plus the proxy's 20 ms; compounding would grow them.
    assert statistics.median(gaps) == pytest.approx((ITL_S + DELAY_S) * 1000, abs=4)
    assert max(gaps[-5:]) < (ITL_S + DELAY_S) * 1000 + 10, gaps
    assert statistics.median(gaps_ms(direct)) == pytest.approx(ITL_S * 1000, abs=4)
    # The first token is not held back: TTFT grows by the proxy's own hop (a connection to
    # the server, scheduling on a loaded host), far less than one delay per token (400 ms).
    assert p.first_token_ns is not None and d.first_token_ns is not None
    assert (p.first_token_ns - p.send_ns) / 1e6 < (d.first_token_ns - d.send_ns) / 1e6 + 60


def test_kept_alive_connections_start_each_response_afresh(server: Endpoint) -> None:
    with delayed(server, DELAY_S) as slow:
        res = run(slow, n=3)
    # Were the event count not restarted per response, the second response's first token
    # would wait TOKENS more delays (400 ms) and its gaps would not change.
    for r in res.records:
        assert r.first_token_ns is not None
        assert (r.first_token_ns - r.send_ns) / 1e6 < 20 + 100, r
        gaps = [(b - a) / 1e6 for a, b in zip(r.chunk_ns, r.chunk_ns[1:], strict=False)]
        assert statistics.median(gaps) == pytest.approx((ITL_S + DELAY_S) * 1000, abs=5), gaps


def test_no_delay_means_the_endpoint_itself(server: Endpoint) -> None:
    with delayed(server, 0.0) as same:
        assert same is server


def test_bad_set_ups_say_what_was_wrong() -> None:
    with pytest.raises(DelayProxyError, match=r"delay -1 s must be 0 or more"):
        DelayingProxy("127.0.0.1", 1, -1)
    with (
        pytest.raises(DelayProxyError, match="not plain http"),
        delayed(Endpoint(base_url="https://example.invalid", model="m"), 0.01),
    ):
        pass
