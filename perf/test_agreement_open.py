"""servelab and ``vllm bench serve`` agree open loop too: same rate, same seed, same server.

Two checks:

1. Schedules (no server): `servelab.arrivals.vllm_seeded` gives the very offsets vLLM's
   ``get_request`` waits for under ``--seed`` (numpy's legacy global generator), for Poisson
   and gamma arrivals.
2. Measurements (the profile's running server), on the principles of
   perf/test_agreement.py: servelab's client and vLLM's ``vllm.benchmarks.serve.benchmark``
   take turns, one at a time, in pairs of adjacent turns whose leader alternates (ABBA);
   each turn is one open-loop run of REQUESTS requests due at the same seeded Poisson
   times (RATE req/s, SEED, no concurrency cap) with its own fresh prompts. Per metric
   (request throughput, median and p99 TTFT, median and p99 TPOT) each turn gives one
   value; the median over the pairs of log(servelab / vLLM) must be within 2 % plus 5
   standard errors of itself; a host too noisy to resolve 20 % skips with its figures.
   (p99 of REQUESTS requests per turn is near their maximum: the widest of the five.)
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import numpy as np
import pytest

from perf.test_agreement import (
    agreement_target,
    alternate_turns,
    judge_agreement,
    vllm_bench_turn,
)
from servelab import arrivals, metrics
from servelab.client import completion_payload
from servelab.loadgen import RunResult, run_requests_async
from servelab.profiles import Profile
from servelab.server import Endpoint

pytestmark = pytest.mark.perf

#: Per turn: REQUESTS requests of PROMPT/OUTPUT tokens due at Poisson times at RATE req/s
#: (vLLM's seed SEED); PAIRS pairs of adjacent turns. About 4 s a turn on the CPU default.
PROMPT, OUTPUT, REQUESTS, RATE, SEED, PAIRS = 32, 16, 8, 4.0, 0, 12
NAMES = ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def _vllm() -> Any:
    return pytest.importorskip("vllm.benchmarks.serve", reason="vLLM is not installed here")


# --------------------------------------------------------------------------- schedules


def _vllm_offsets(
    vs: Any, monkeypatch: pytest.MonkeyPatch, n: int, rate: float, burstiness: float, seed: int
) -> list[float]:
    """The offsets vLLM's get_request sleeps until, read with its clock stopped at 0."""
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    monkeypatch.setattr(vs, "asyncio", types.SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(vs, "time", types.SimpleNamespace(time=lambda: 0.0))

    async def drain() -> None:
        async for _ in vs.get_request(list(range(n)), rate, burstiness):
            pass

    np.random.seed(seed)  # what `vllm bench serve --seed` does before it runs
    asyncio.run(drain())
    return waits


@pytest.mark.parametrize(("burstiness", "seed"), [(1.0, 0), (1.0, 7), (0.5, 3), (2.0, 11)])
def test_same_seed_same_arrival_times_as_vllm(
    monkeypatch: pytest.MonkeyPatch, burstiness: float, seed: int
) -> None:
    vs = _vllm()
    theirs = _vllm_offsets(vs, monkeypatch, 20, 4.0, burstiness, seed)
    ours = arrivals.vllm_seeded(20, 4.0, burstiness=burstiness, seed=seed).offsets_s
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    assert arrivals.schedule(20, 4.0, burstiness=burstiness, seed=seed).offsets_s != ours


# --------------------------------------------------------------------------- measurements


async def _vllm_turn(vs: Any, ep: Endpoint, texts: list[str]) -> dict[str, Any]:
    np.random.seed(SEED)  # `vllm bench serve --seed SEED`
    return await vllm_bench_turn(
        vs,
        ep,
        texts,
        prompt=PROMPT,
        output=OUTPUT,
        request_rate=RATE,
        max_concurrency=None,
        metrics=["ttft", "tpot"],
    )


def _servelab_turn(ep: Endpoint, texts: list[str], timeout_s: float) -> RunResult:
    plan = arrivals.vllm_seeded(len(texts), RATE, seed=SEED)
    payloads = [completion_payload(ep.model, t, OUTPUT) for t in texts]
    return asyncio.run(
        run_requests_async(
            ep,
            payloads,
            concurrency=None,
            arrivals_s=plan.offsets_s,
            prompt_tokens=[PROMPT] * len(texts),
            timeout_s=timeout_s,
        )
    )


@pytest.mark.slow
def test_open_loop_turns_agree_with_vllm_bench_serve(
    servelab_endpoint: Endpoint, servelab_profile: Profile | None
) -> None:
    vs = _vllm()
    ep, prompts, limits = agreement_target(servelab_endpoint, servelab_profile, PROMPT, OUTPUT)

    def values(res: RunResult) -> tuple[float, ...]:
        m = metrics.compute(res.records, res.start_ns, res.end_ns, percentiles=[99.0])
        assert m.ttft_ms and m.tpot_ms, "a servelab turn gave no latency figures"
        return (
            m.request_throughput,
            m.ttft_ms.median,
            m.ttft_ms.pct(99.0),
            m.tpot_ms.median,
            m.tpot_ms.pct(99.0),
        )

    ours, theirs = alternate_turns(
        NAMES,
        lambda tag: prompts.make(PROMPT, f"agree-open-{tag}", REQUESTS),
        lambda texts: _servelab_turn(ep, texts, limits.request_timeout_s),
        values,
        lambda texts: _vllm_turn(vs, ep, texts),
        output=OUTPUT,
        max_error_rate=limits.max_error_rate,
    )
    judge_agreement(
        NAMES,
        ours,
        theirs,
        f"open-loop agreement over {PAIRS} pairs of turns x {REQUESTS} requests, Poisson "
        f"{RATE:g} req/s seed {SEED} (vLLM's generator), prompt {PROMPT}, output {OUTPUT}, no "
        "concurrency cap, alternating ABBA",
    )
