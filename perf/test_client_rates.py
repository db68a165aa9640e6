"""The client at GPU rates (issue 16 item 5): at concurrency 64 and 256, servelab's load
generator is not the bottleneck, and its TTFT and TPOT agree with a second client's.

The second client is vLLM's own streaming request function
(``vllm/benchmarks/lib/endpoint_request_func.py``: aiohttp, its own SSE handling and
clocks), imported from the installed vLLM or, where vLLM cannot be installed (the GPU
machine), loaded alone from the file named by ``SERVELAB_VLLM_REQUEST_FUNC`` (it needs only
aiohttp, regex and tqdm). Here it is driven closed-loop at the same concurrency by a
semaphore, as ``vllm bench serve --max-concurrency`` drives it.

The two clients take turns on the profile's running server (ABBA, fresh prompts per turn) and
are compared on the median over pairs of adjacent turns, as `perf.test_agreement` does at
concurrency 1. Each servelab turn must also pass its own saturation check
(`RunResult.client_lagged`: event-loop lag and the worker's CPU share): a client that says it
kept up and a second client that reads the same latencies agree that neither was the limit.

Runs only for a profile with a concurrency level of at least 64 (the GPU profiles); the CPU
default skips it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from perf.test_agreement import MAX_NOISE, agreement
from servelab import metrics, workloads
from servelab.loadgen import RunResult, run_requests_async
from servelab.profiles import Profile
from servelab.server import Endpoint

pytestmark = pytest.mark.perf

MIN_LEVEL = 64
PROMPT, OUTPUT, PAIRS = 64, 32, 4
ENV = "SERVELAB_VLLM_REQUEST_FUNC"


def _second_client() -> Any:
    """vLLM's request-function module: the installed one, else the file `ENV` names."""
    try:
        return importlib.import_module("vllm.benchmarks.lib.endpoint_request_func")
    except ImportError:
        pass
    path = os.environ.get(ENV)
    if not path:
        pytest.skip(f"no second client: vLLM is not installed and {ENV} names no file")
    if not Path(path).is_file():
        pytest.fail(f"{ENV}={path}: no such file (vLLM's endpoint_request_func.py)")
    spec = importlib.util.spec_from_file_location("vllm_endpoint_request_func", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _levels(profile: Profile | None) -> list[int]:
    shape = None if profile is None else profile.workloads.concurrency
    levels = [] if shape is None else [c for c in shape.levels if c >= MIN_LEVEL]
    if not levels:
        pytest.skip(f"the profile has no concurrency level >= {MIN_LEVEL} (GPU profiles do)")
    return levels


async def _second_turn(
    rf: Any, ep: Endpoint, texts: list[str], level: int, settings: workloads.Settings
) -> list[Any]:
    import aiohttp

    from servelab.engine_traits import traits_of

    # The same request fields and connection policy as servelab's own turns.
    extra = {"temperature": 0.0, "top_p": 1.0, "seed": 0, **dict(settings.extra_body)}
    if traits_of(ep.profile).keep_alive:
        connector = aiohttp.TCPConnector(limit=level, keepalive_timeout=60)
    else:  # aiohttp refuses a keep-alive timeout together with force_close
        connector = aiohttp.TCPConnector(limit=level, force_close=True)
    timeout = aiohttp.ClientTimeout(total=6 * 60 * 60)
    gate = asyncio.Semaphore(level)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(text: str) -> Any:
            async with gate:
                inp = rf.RequestFuncInput(
                    prompt=text,
                    api_url=ep.api_base + "/completions",
                    prompt_len=PROMPT,
                    output_len=OUTPUT,
                    model=ep.model,
                    ignore_eos=True,
                    extra_body=extra,
                    extra_headers=dict(ep.headers) or None,
                )
                return await rf.async_request_openai_completions(inp, session)

        return list(await asyncio.gather(*(one(t) for t in texts)))


def _second_values(outs: list[Any]) -> tuple[float, float]:
    """Median TTFT and median TPOT (ms) as vLLM's calculate_metrics defines them.

    vLLM's function reads `usage` only from a chunk without choices; llama.cpp sends usage
    with its last choice, so there it reads 0 tokens. The length is forced (ignore_eos, which
    servelab's own turns verify against usage), so the asked length stands in, and the
    function's own chunk count must reach it."""
    failed = [o.error for o in outs if not o.success]
    assert not failed, f"second client: {len(failed)} failed requests, first: {failed[0][:300]}"
    lens = {o.output_tokens or OUTPUT for o in outs}
    assert lens == {OUTPUT}, f"second client: output lengths {sorted(lens)}, asked {OUTPUT}"
    chunks = {len(o.itl) + 1 for o in outs}
    assert min(chunks) >= OUTPUT, f"second client: {sorted(chunks)} chunks for {OUTPUT} tokens"
    ttft = statistics.median(o.ttft * 1e3 for o in outs)
    tpot = statistics.median((o.latency - o.ttft) / (OUTPUT - 1) * 1e3 for o in outs)
    return ttft, tpot


def _servelab_turn(
    ep: Endpoint, texts: list[str], level: int, settings: workloads.Settings
) -> RunResult:
    bodies = workloads.payloads(ep, texts, OUTPUT, settings)
    return asyncio.run(
        run_requests_async(
            ep,
            bodies,
            concurrency=level,
            prompt_tokens=[PROMPT] * len(texts),
            timeout_s=settings.timeout_s,
        )
    )


def test_client_keeps_up_and_agrees_at_gpu_rates(
    servelab_endpoint: Endpoint, servelab_profile: Profile | None, servelab_measure: Any
) -> None:
    levels = _levels(servelab_profile)
    rf = _second_client()
    ep = servelab_endpoint
    settings = servelab_measure.settings
    prompts = workloads.Prompts(ep)
    workloads.warm_up(
        ep, prompts, requests=2, prompt_tokens=PROMPT, output_tokens=OUTPUT, settings=settings
    )
    lines, bad = [], []
    for level in levels:
        ours: dict[str, list[float]] = {"median_ttft_ms": [], "median_tpot_ms": []}
        theirs: dict[str, list[float]] = {"median_ttft_ms": [], "median_tpot_ms": []}
        for turn in range(2 * PAIRS):
            side = "servelab" if turn % 4 in (0, 3) else "second"  # ABBA
            texts = prompts.make(PROMPT, f"rates-{level}-{side}-{turn}", level)
            if side == "servelab":
                res = _servelab_turn(ep, texts, level, settings)
                problems = res.invalid_reasons(0.0)
                assert not problems, f"c{level} turn {turn}: servelab run invalid: {problems}"
                m = metrics.compute(res.records, res.start_ns, res.end_ns)
                assert m.ttft_ms and m.tpot_ms, f"c{level} turn {turn}: no latency figures"
                ttft, tpot = m.ttft_ms.median, m.tpot_ms.median
                busy = max((b for b in res.client_busy() if b is not None), default=None)
                servelab_measure.progress(
                    f"c{level} turn {turn}: {m.output_throughput:.0f} tok/s, client busy "
                    f"{'n/a' if busy is None else f'{busy:.0%}'}"
                )
            else:
                outs = asyncio.run(_second_turn(rf, ep, texts, level, settings))
                ttft, tpot = _second_values(outs)
            side_values = ours if side == "servelab" else theirs
            side_values["median_ttft_ms"].append(ttft)
            side_values["median_tpot_ms"].append(tpot)
        checks = [agreement(k, ours[k], theirs[k]) for k in ours]
        report = "; ".join(c.describe().replace("vLLM", "vLLM's request function") for c in checks)
        lines.append(f"c{level}, {level} requests a turn, {PAIRS} ABBA pairs: {report}")
        if any(c.noise > MAX_NOISE for c in checks):
            lines.append(f"c{level}: too noisy to resolve the check (noise > {MAX_NOISE:.0%})")
            continue
        bad += [f"c{level} {c.describe()}" for c in checks if not c.ok]
    print("\n".join(lines))
    assert not bad, "servelab and vLLM's request function disagree: " + "; ".join(bad)
