"""Client capacity: how many stream chunks per second the load generator can take in.

The source is a stand-in, on purpose: a local HTTP/1.1 server (its own process) that
answers every /v1/completions request with ``max_tokens`` vLLM-shaped completion chunks
(one SSE event per HTTP chunk, ~230 bytes each, plus usage and [DONE]) as fast as the socket
takes them. No engine can stream that fast, which is the point: whatever rate is measured
is the client's ceiling, not the server's.

Measured in one run, against the same source and the same requests:

- ``servelab`` single process, and with ``--workers`` processes (`loadgen.run_requests`);
- vLLM's own request function (``async_request_openai_completions``, aiohttp) in one process;
- a plain httpx loop over ``aiter_lines()`` (no SSE framing, no JSON) in one process.

For each: wall chunks/s, chunks per CPU-second of the client processes ("per core"),
and for servelab the event-loop lag its watchdog saw (a run whose lag passes the limit is
marked invalid by the client itself).

    .venv/bin/python benchmarks/client_capacity.py --requests 64 --chunks 2000 \
        --concurrency 8 --workers 1 2 4 --json results/client_capacity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from servelab.client import completion_payload
from servelab.loadgen import run_requests
from servelab.server import Endpoint

MODEL = "stand-in"


# --------------------------------------------------------------------------- the source


def _event(i: int) -> bytes:
    body = {
        "id": "cmpl-0123456789abcdef0123456789abcdef",
        "object": "text_completion",
        "created": 1790000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": f" w{i % 1000}",
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
                "token_ids": [1000 + i % 1000],
            }
        ],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _body(n: int) -> bytes:
    parts = [_event(i) for i in range(n)]
    usage = {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n}}
    parts.append(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    out = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    ]
    out += [b"%x\r\n%s\r\n" % (len(p), p) for p in parts]
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def _serve(port_q: Any) -> None:
    bodies: dict[int, bytes] = {}

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = next(
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length:")
                )
                n = int(json.loads(await r.readexactly(length))["max_tokens"])
                if n not in bodies:
                    bodies[n] = _body(n)
                w.write(bodies[n])
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            pass
        finally:
            w.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_q.put(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------- clients


def figures(chunks: int, wall: float, cpu: float) -> dict[str, float]:
    return {
        "chunks": chunks,
        "wall_s": wall,
        "cpu_s": cpu,
        "chunks_per_s": chunks / wall,
        "chunks_per_cpu_s": chunks / cpu if cpu > 0 else float("nan"),
    }


def servelab_run(ep: Endpoint, n_req: int, n_chunks: int, conc: int, workers: int) -> Any:
    payloads = [completion_payload(MODEL, f"p{i}", n_chunks) for i in range(n_req)]

    # Wall time and CPU are the run's own (common start to last record; each worker's CPU
    # during the run), so process spawn and imports do not count against the client.
    res = run_requests(ep, payloads, concurrency=conc, workers=workers, progress=False)
    bad = [r.error for r in res.records if not r.success]
    if bad:
        raise SystemExit(f"servelab run had failures: {bad[:3]}")
    chunks = sum(len(r.chunk_ns) for r in res.records)
    out: dict[str, Any] = figures(
        chunks, res.duration_s, sum(lag.cpu_s or 0.0 for lag in res.loop_lag)
    )
    out["lag"] = [
        {"p99_ms": lag.p99_ms, "max_ms": lag.max_ms, "samples": lag.samples, "cpu_s": lag.cpu_s}
        for lag in res.loop_lag
    ]
    out["invalid"] = res.client_lagged()
    return out


def _vllm_request_func(path: str | None) -> Any:
    """vLLM's request-function module: from the installed vLLM, or (on a host without vLLM)
    from a copy of ``vllm/benchmarks/lib/endpoint_request_func.py`` given by path."""
    if path is None:
        from vllm.benchmarks.lib import endpoint_request_func

        return endpoint_request_func
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_endpoint_request_func", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load vLLM's request function from {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def vllm_run(
    base: str, n_req: int, n_chunks: int, conc: int, func_file: str | None
) -> dict[str, float]:
    import aiohttp

    erf = _vllm_request_func(func_file)
    RequestFuncInput = erf.RequestFuncInput
    async_request_openai_completions = erf.async_request_openai_completions

    async def main() -> tuple[int, float, float]:
        sem = asyncio.Semaphore(conc)
        conn = aiohttp.TCPConnector(limit=conc, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=conn) as session:

            async def one(i: int) -> int:
                inp = RequestFuncInput(
                    prompt=f"p{i}",
                    api_url=base + "/v1/completions",
                    prompt_len=8,
                    output_len=n_chunks,
                    model=MODEL,
                    ignore_eos=True,
                )
                async with sem:
                    out = await async_request_openai_completions(inp, session)
                if not out.success:
                    raise SystemExit(f"vLLM request function failed: {out.error[:300]}")
                return len(out.itl) + 1

            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(await asyncio.gather(*(one(i) for i in range(n_req))))
            return n, time.perf_counter() - t0, time.process_time() - c0

    return figures(*asyncio.run(main()))


def httpx_lines_run(base: str, n_req: int, n_chunks: int, conc: int) -> dict[str, float]:
    async def main() -> tuple[int, float, float]:
        sem = asyncio.Semaphore(conc)
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as http:

            async def one(i: int) -> int:
                n = 0
                async with (
                    sem,
                    http.stream(
                        "POST",
                        base + "/v1/completions",
                        json={"model": MODEL, "prompt": f"p{i}", "max_tokens": n_chunks},
                    ) as resp,
                ):
                    async for line in resp.aiter_lines():
                        if line.startswith('data: {"id"'):
                            n += 1
                return n

            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(await asyncio.gather(*(one(i) for i in range(n_req))))
            return n, time.perf_counter() - t0, time.process_time() - c0

    return figures(*asyncio.run(main()))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=2000, help="chunks per request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=2, help="runs per client (best is kept)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's request function")
    ap.add_argument(
        "--vllm-func-file",
        default=None,
        help="path of a copy of vllm/benchmarks/lib/endpoint_request_func.py (hosts without "
        "vLLM installed)",
    )
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    source = ctx.Process(target=_serve, args=(q,), daemon=True)
    source.start()
    port = q.get(timeout=60)
    base = f"http://127.0.0.1:{port}"
    ep = Endpoint(base_url=base, model=MODEL)
    shape = (args.requests, args.chunks, args.concurrency)
    results: dict[str, Any] = {}
    try:
        servelab_run(ep, 4, 50, 2, 1)  # warm the source's body cache and the imports
        plans: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (f"servelab workers={w}", lambda w=w: servelab_run(ep, *shape, w))  # type: ignore[misc]
            for w in args.workers
        ]
        if not args.no_vllm:
            plans.append(
                (
                    "vLLM request function (1 process)",
                    lambda: vllm_run(base, *shape, args.vllm_func_file),
                )
            )
        plans.append(("httpx aiter_lines loop (1 process)", lambda: httpx_lines_run(base, *shape)))
        for name, fn in plans:
            runs = [fn() for _ in range(args.repeats)]
            results[name] = max(runs, key=lambda r: r["chunks_per_s"])
            r = results[name]
            print(
                f"{name:38s} {r['chunks_per_s']:>9.0f} chunks/s wall  "
                f"{r['chunks_per_cpu_s']:>9.0f} chunks per client CPU-s  "
                f"({r['chunks']} chunks, {r['wall_s']:.2f} s)"
                + (
                    f"  loop lag p99 {[round(x['p99_ms'], 1) for x in r['lag']]} ms"
                    if "lag" in r
                    else ""
                ),
                flush=True,
            )
    finally:
        source.kill()
        source.join()
    meta = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}",
        "python": sys.version.split()[0],
        "httpx": httpx.__version__,
        "load_avg_1m_at_end": os.getloadavg()[0],
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "shape": {
            "requests": args.requests,
            "chunks_per_request": args.chunks,
            "concurrency": args.concurrency,
        },
        "source": "local stand-in SSE source (separate process), pre-built vLLM-shaped chunks",
    }
    print(json.dumps(meta, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
