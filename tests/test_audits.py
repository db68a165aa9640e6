"""Issue 24, item 3: each integrity audit passes against the honest scripted stand-in and
fails against a stand-in built to break it (tests/fakes/scripted_server.py modes), through
servelab's real client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from servelab import audits
from servelab.client import RequestRecord, completion_payload
from servelab.loadgen import run_requests
from servelab.server import Endpoint
from tests.fakes.scripted_server import ScriptedServer


@contextmanager
def server(mode: str, ttft_s: float = 0.020) -> Iterator[Endpoint]:
    with ScriptedServer(ttft_s, 0.001, mode) as s:
        yield Endpoint(base_url=f"http://127.0.0.1:{s.port}", model="scripted")


def send(
    ep: Endpoint, prompts: list[str], n: int, *, c: int = 1, ignore_eos: bool = True
) -> list[RequestRecord]:
    payloads = [completion_payload("scripted", p, n, ignore_eos=ignore_eos) for p in prompts]
    run = run_requests(ep, payloads, concurrency=c)
    return sorted(run.records, key=lambda r: r.index)


PROMPTS = [f"prompt {i} of the audit" for i in range(4)]


def test_cache_audit_passes_honest_and_fails_a_caching_server() -> None:
    prompts = [f"cache audit prompt {i}" for i in range(8)]
    for mode, ok in (("ok", True), ("cache", False)):
        with server(mode, ttft_s=0.050) as ep:  # a TTFT long against the client's noise
            first, again = send(ep, prompts, 4), send(ep, prompts, 4)
        a = audits.cache_audit(first, again)
        assert a.ok is ok, a.describe()
    assert a.value is not None and a.value > 1.0  # 5x sooner: +400 %
    assert any("faster" in p for p in a.problems)
    assert audits.cache_audit(first, again, caching_declared=True).ok  # declared: allowed
    # A measured prompt that reports cached tokens fails even when declared.
    assert not audits.cache_audit(again, again, caching_declared=True).ok


def test_token_audit_passes_honest_and_fails_a_truncating_server() -> None:
    with server("ok") as ep:
        good = audits.token_audit(send(ep, PROMPTS, 6), count=lambda t: len(t.split()))
    assert good.ok and good.value == 1.0, good.describe()
    with server("truncate") as ep:
        bad = audits.token_audit(send(ep, PROMPTS, 6), count=lambda t: len(t.split()))
    assert not bad.ok and bad.value == 0.0
    assert any("the stream carried 5" in p for p in bad.problems), bad.problems


def test_length_audit_passes_honest_and_fails_an_early_eos() -> None:
    with server("ok") as ep:
        assert audits.length_audit(send(ep, PROMPTS, 8, ignore_eos=False), 8).ok
    with server("eos") as ep:
        short = audits.length_audit(send(ep, PROMPTS, 8, ignore_eos=False), 8)
    assert not short.ok and short.value == 0.5 and "-50%" in short.problems[0]


def test_batch_invariance_passes_honest_and_fails_a_batch_dependent_server() -> None:
    for mode, share in (("ok", 1.0), ("batch", 0.0)):
        with server(mode) as ep:
            solo, batched = send(ep, PROMPTS, 8), send(ep, PROMPTS, 8, c=4)
        a = audits.batch_invariance(solo, batched)
        assert a.value == share, a.describe()
    assert "differs from solo at character" in a.problems[0]


def test_forced_length_audit_passes_honest_and_fails_a_server_ignoring_ignore_eos() -> None:
    # The "eos" stand-in stops early only without ignore_eos: forced, it gives every token.
    for mode in ("ok", "eos"):
        with server(mode) as ep:
            good = audits.forced_length_audit(send(ep, PROMPTS, 8), 8)
        assert good.ok and good.value == 1.0, good.describe()
    with server("noforce") as ep:
        recs = send(ep, PROMPTS, 8)
    bad = audits.forced_length_audit(recs, 8)
    assert not bad.ok and bad.value == 0.0
    assert "4 output tokens for 8 forced (finish 'stop')" in bad.problems[0], bad.problems
    assert audits.length_ratios(recs, 8) == [0.5] * 4
    # The mean-length audit (TEST09) fails it too: half the length is -50 %.
    assert not audits.length_audit(recs, 8).ok


def test_length_audit_tolerance_is_ten_percent_either_way() -> None:
    with server("ok") as ep:
        recs = send(ep, PROMPTS, 10, ignore_eos=False)
    assert audits.length_audit(recs, 10).value == 1.0
    assert audits.length_audit(recs, 11).ok  # 10 / 11 = -9 %
    assert not audits.length_audit(recs, 12).ok  # 10 / 12 = -17 %
    assert not audits.length_audit(recs, 9).ok  # 10 / 9 = +11 %: too long fails too
