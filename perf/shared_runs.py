"""Two clients on the same run: servelab's load generator and vLLM's streaming request
function drive one server at the same time, half the concurrency each, so both read the same
batches, the same admission waves and the same slow moments of the engine (issue 16 item 5).

Turns that alternate (ABBA, `perf.test_agreement`) compare runs that follow each other; on an
engine whose own run-to-run spread is wide (llama-server at c64 and c256 read ±22-49 % over 4
pairs on an H100, BENCHMARKS.md §12), that spread hides a 2 % disagreement. Sharing each run
takes the engine's spread out of the comparison: what is left is each client's own reading of
its own requests.

The second client runs in its own process (spawned, its own interpreter and event loop), so
neither client's work delays the other's reading of its chunks; both start at one signal.
The module is vLLM's installed ``vllm/benchmarks/lib/endpoint_request_func.py`` or, where
vLLM cannot be installed (the GPU machine), the same file loaded alone from a path.

servelab stays in the calling process (in the suite, the pytest process: where its readings
come from in every run), so what the pair shows includes that process's own cost. Where the
client shares its cores with the server, the place alone can move TTFT: on the 2-core CPU VM
against the scripted stand-in (2026-12-07), vLLM's function in the calling process read its
median TTFT 5.5-8.9 ms above the same function in the spawned one at c256 (4 shared runs)
and 0.7-8.5 ms below it at c128, while servelab against vLLM's function read +9.6 % at c256
(5 runs; TTFT tolerance ±42.6 %, too wide to resolve either) and TPOT +0.20 % (±3.1 %).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perf.test_agreement import Agreement, agreement
from servelab import metrics
from servelab.client import http_session
from servelab.loadgen import RunResult, run_requests_async
from servelab.server import Endpoint

MODULE = "vllm.benchmarks.lib.endpoint_request_func"


class SecondClientMissing(RuntimeError):
    """Neither the installed vLLM nor the named file gives the second client."""


def load_second_client(path: str | None, name: str = MODULE) -> Any:
    """vLLM's request-function module (`name`): the installed one, else the file at `path`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    if not path:
        raise SecondClientMissing("vLLM is not installed and no file names its request function")
    if not Path(path).is_file():
        raise SecondClientMissing(f"{path}: no such file (vLLM's endpoint_request_func.py)")
    spec = importlib.util.spec_from_file_location("vllm_endpoint_request_func", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def second_extra(engine_fields: Mapping[str, Any]) -> dict[str, Any]:
    """The body fields of the second client's requests: servelab's own greedy, seeded
    sampling and the engine's measured fields (`EngineTraits.measured_extra`)."""
    return {"temperature": 0.0, "top_p": 1.0, "seed": 0, **engine_fields}


@dataclass(frozen=True)
class SecondJob:
    """One turn of the second client, in plain values (it crosses a process boundary)."""

    source: str | None  # the request function's file where vLLM is not installed
    api_url: str  # .../v1/completions
    model: str
    texts: tuple[str, ...]
    concurrency: int
    prompt_len: int
    output_len: int
    keep_alive: bool
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SecondOut:
    """What the second client read of one request (vLLM's RequestFuncOutput, in part)."""

    success: bool
    error: str
    ttft_s: float
    latency_s: float
    chunks: int  # its inter-token gaps + 1
    output_tokens: int  # from usage; 0 where the engine sent usage with its last choice


async def second_turn(
    rf: Any, job: SecondJob, start: Any = None, gap_s: float = 0.0
) -> list[SecondOut]:
    """The second client's requests, closed-loop at `job.concurrency` (a semaphore, as
    `vllm bench serve --max-concurrency` drives it), in a session of its own built as
    servelab's are (`client.http_session`: the same connection policy). With `start`
    (ready, go, start_at: two events and a shared perf_counter_ns), the session is built
    first, ready is set, and the requests wait for go, then for start_at. With `gap_s`,
    request i starts (½ + min(i, concurrency − 1))·gap after the start (`interleaved`)."""
    gate = asyncio.Semaphore(job.concurrency)
    async with http_session(keep_alive=job.keep_alive) as session:

        async def one(i: int, text: str) -> SecondOut:
            if gap_s > 0:
                due = t0 + int(interleaved(i, job.concurrency, gap_s, 0.5) * 1e9)
                await asyncio.sleep(max(0.0, (due - time.perf_counter_ns()) / 1e9))
            async with gate:
                inp = rf.RequestFuncInput(
                    prompt=text,
                    api_url=job.api_url,
                    prompt_len=job.prompt_len,
                    output_len=job.output_len,
                    model=job.model,
                    ignore_eos=True,
                    extra_body=dict(job.extra_body),
                    extra_headers=dict(job.headers) or None,
                )
                o = await rf.async_request_openai_completions(inp, session)
                return SecondOut(
                    bool(o.success),
                    str(o.error or ""),
                    float(o.ttft),
                    float(o.latency),
                    len(o.itl) + 1,
                    int(o.output_tokens or 0),
                )

        if start is not None:
            ready, go, start_at = start
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            await asyncio.sleep(max(0.0, (start_at.value - time.perf_counter_ns()) / 1e9))
        t0 = time.perf_counter_ns() if start is None else int(start_at.value)
        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(job.texts))))


def interleaved(i: int, concurrency: int, gap_s: float, phase: float) -> float:
    """When request i of a closed loop at `concurrency` starts, in seconds from the run's
    start: the first `concurrency` one gap apart from `phase` gaps on, the rest when the
    last of them has (each then waits for a free slot). Two clients at phases 0 and ½
    alternate on the wire."""
    return (phase + min(i, concurrency - 1)) * gap_s


def second_values(outs: Sequence[SecondOut], output: int) -> dict[str, float]:
    """Mean and median TTFT and TPOT (ms) as vLLM's calculate_metrics defines them, keyed as
    `METRICS` (TPOT per request: (latency - TTFT) / (output - 1)).

    vLLM's function reads `usage` only from a chunk without choices; llama.cpp sends usage
    with its last choice, so there it reads 0 tokens. The length is forced (ignore_eos, which
    servelab's own turns verify against usage), so the asked length stands in, and the
    function's own chunk count must reach it."""
    failed = [o.error for o in outs if not o.success]
    assert not failed, f"second client: {len(failed)} failed requests, first: {failed[0][:300]}"
    lens = {o.output_tokens or output for o in outs}
    assert lens == {output}, f"second client: output lengths {sorted(lens)}, asked {output}"
    chunks = {o.chunks for o in outs}
    assert min(chunks) >= output, f"second client: {sorted(chunks)} chunks for {output} tokens"
    ttft = [o.ttft_s * 1e3 for o in outs]
    tpot = [(o.latency_s - o.ttft_s) / (output - 1) * 1e3 for o in outs]
    return {
        "median_ttft_ms": statistics.median(ttft),
        "mean_ttft_ms": statistics.fmean(ttft),
        "median_tpot_ms": statistics.median(tpot),
        "mean_tpot_ms": statistics.fmean(tpot),
    }


def _second_entry(
    job: SecondJob, gap_s: float, ready: Any, go: Any, start_at: Any, results: Any
) -> None:
    """Body of the second client's process: import, report ready, wait for the common
    start, run, send the outputs back (or the error, which the parent raises)."""
    try:
        rf = load_second_client(job.source)
        results.put(asyncio.run(second_turn(rf, job, (ready, go, start_at), gap_s)))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class SharedRun:
    """One run both clients shared: servelab's result and the second client's outputs."""

    servelab: RunResult
    second: list[SecondOut]

    def figures(self, output: int) -> tuple[dict[str, float], dict[str, float]]:
        """Each side's mean and median TTFT and TPOT (ms), servelab's then the second
        client's, keyed as `METRICS`."""
        m = metrics.compute(self.servelab.records, self.servelab.start_ns, self.servelab.end_ns)
        assert m.ttft_ms is not None and m.tpot_ms is not None, "servelab's side: no latencies"
        mine = {
            "median_ttft_ms": m.ttft_ms.median,
            "mean_ttft_ms": m.ttft_ms.mean,
            "median_tpot_ms": m.tpot_ms.median,
            "mean_tpot_ms": m.tpot_ms.mean,
        }
        return mine, second_values(self.second, output)


#: From the signal to the common start: both clients are built by then (servelab's HTTP
#: client, with its TLS context, took up to 60 ms on a busy 2-core host).
LEAD_NS = 250_000_000
#: The two clients' first requests alternate this far apart (servelab's at 0, 1, 2, ... gaps,
#: the second's half a gap later). Sent as two bursts, one client's requests reached the
#: engine ahead of the other's and took its first prefill batches: on llama-server (64 slots,
#: H100, 2026-12-07) servelab's half read median TTFT 14 % (c64) and 27 % (c256) below the
#: second client's and TPOT 2-3.5 % above it, and at c64 the sign of both followed which half
#: was ahead in every one of the 5 runs. Alternating makes the halves' places in the engine's
#: queue the same on average, so what is left is each client's reading.
GAP_S = 0.001


def shared_run(
    ep: Endpoint,
    bodies: Sequence[Mapping[str, Any]],
    prompt_len: int,
    concurrency: int,
    job: SecondJob,
    *,
    timeout_s: float,
    gap_s: float = GAP_S,
) -> SharedRun:
    """servelab's requests (`bodies`, closed-loop at `concurrency`) and the second client's
    (`job`) on `ep`, both starting at one instant once both clients are built, their first
    requests alternating `gap_s` apart (0: two bursts)."""
    arrivals = (
        [interleaved(i, concurrency, gap_s, 0.0) for i in range(len(bodies))] if gap_s > 0 else None
    )
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    start_at = ctx.Value("q", 0)
    proc = ctx.Process(
        target=_second_entry, args=(job, gap_s, ready, go, start_at, results), daemon=True
    )
    proc.start()
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("second client: its process did not come up within 120 s")
        start_at.value = time.perf_counter_ns() + LEAD_NS
        go.set()
        mine = asyncio.run(
            run_requests_async(
                ep,
                bodies,
                concurrency=concurrency,
                arrivals_s=arrivals,
                prompt_tokens=[prompt_len] * len(bodies),
                timeout_s=timeout_s,
                start_at_ns=int(start_at.value),
            )
        )
        theirs = results.get(timeout=timeout_s * (1 + len(job.texts)) + 120)
        if isinstance(theirs, str):
            raise RuntimeError(f"second client failed: {theirs}")
        return SharedRun(mine, theirs)
    finally:
        go.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


#: What a shared run's pairs are judged on: each side's medians and means, as
#: `SharedRun.figures` keys them. Means beside medians: where the engine batches prompts, a
#: level's TTFT (and TPOT) can fall in two modes, one batch apart, and a median that sits
#: between them jumps from one to the other on a request's place (llama-server at c64, 64
#: requests a client, H100, 2026-12-07: medians +27 % apart, ±78 % over 5 runs, while the
#: means read +0.37 %, ±11.6 %, and both sides' p10 and p90 matched within 10 %).
METRICS = ("median_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "mean_tpot_ms")


@dataclass(frozen=True)
class Pairs:
    """A level's shared runs: each side's figures run by run and, per metric, the judgement
    of the pairs (`perf.test_agreement.agreement`: 2 % plus the pairs' own noise)."""

    ours: dict[str, list[float]]
    theirs: dict[str, list[float]]
    checks: dict[str, Agreement]


def paired_runs(
    ep: Endpoint,
    runs: int,
    inputs: Callable[[int], tuple[Sequence[Mapping[str, Any]], SecondJob]],
    prompt_len: int,
    concurrency: int,
    output: int,
    *,
    timeout_s: float,
    each: Callable[[int, SharedRun, dict[str, float], dict[str, float]], None] | None = None,
    gap_s: float = GAP_S,
) -> Pairs:
    """`runs` shared runs, run r on `inputs(r)` (servelab's bodies, closed-loop at
    `concurrency`, and the second client's job); `each(r, run, mine, second)` sees every run
    and both sides' figures as it ends (to check it or report progress)."""
    ours: dict[str, list[float]] = {k: [] for k in METRICS}
    theirs: dict[str, list[float]] = {k: [] for k in METRICS}
    for r in range(runs):
        bodies, job = inputs(r)
        run = shared_run(ep, bodies, prompt_len, concurrency, job, timeout_s=timeout_s, gap_s=gap_s)
        mine, second = run.figures(output)
        if each is not None:
            each(r, run, mine, second)
        for k in METRICS:
            ours[k].append(mine[k])
            theirs[k].append(second[k])
    return Pairs(ours, theirs, {k: agreement(k, ours[k], theirs[k]) for k in METRICS})
