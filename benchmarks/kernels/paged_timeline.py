"""Where the time of one CPU-paged decode call goes: a device timeline from torch.profiler.

Run on a CUDA machine::

    PYTHONPATH=src python3 benchmarks/kernels/paged_timeline.py --out DIR [--ctx 32768 ...]

For each (context, chunk, step) it warms up, then profiles one call and prints every GPU
kernel and copy with its stream, start (µs from the call's first host instruction) and
duration, then the landmarks: when the host returned, when the first and last staging
kernels ran, and when the last kernel ended. The Chrome trace is kept under DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from paged_inputs import DecodeInputs
from torch.profiler import ProfilerActivity, profile, record_function

import servelab.kernels.paged as paged_mod
from servelab.kernels.staging import stage_blocks


def host_phases(call: Callable[[], None], reps: int = 20) -> dict[str, float]:
    """Without the profiler: host µs from the call's start to the first staging launch, and
    to the return (medians of ``reps``)."""
    first: list[float] = []
    real = stage_blocks

    def spy(*args: Any, **kwargs: Any) -> Any:
        if len(first) == len(ret):
            first.append(time.perf_counter())
        return real(*args, **kwargs)

    ret: list[float] = []
    starts: list[float] = []
    with mock.patch.object(paged_mod, "stage_blocks", spy):
        for _ in range(reps):
            torch.cuda.synchronize()
            starts.append(time.perf_counter())
            call()
            ret.append(time.perf_counter())
            torch.cuda.synchronize()
    return {
        "host_to_first_stage_us": round(statistics.median(
            (f - s0) * 1e6 for f, s0 in zip(first, starts, strict=True)), 1),
        "host_return_noprof_us": round(statistics.median(
            (r - s0) * 1e6 for r, s0 in zip(ret, starts, strict=True)), 1),
    }  # fmt: skip


def one(ctx: int, chunk: int, step: str, out_dir: Path) -> dict[str, object]:
    inputs = DecodeInputs.build(ctx, chunk)

    def call() -> None:
        inputs.call(step)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    host = host_phases(call)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("paged_call"):
            call()
        torch.cuda.synchronize()
    trace = out_dir / f"trace_{ctx // 1024}k_c{chunk // 1024}k_{step}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    marks = [e for e in events if e.get("name") == "paged_call" and e.get("ph") == "X"]
    t0 = min(float(e["ts"]) for e in marks)
    host_end = max(float(e["ts"]) + float(e["dur"]) for e in marks) - t0
    gpu_ev = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: float(e["ts"]),
    )
    rows = []
    for e in gpu_ev:
        start = float(e["ts"]) - t0
        rows.append((start, float(e["dur"]), e.get("args", {}).get("stream"), str(e["name"])))
    gathers = [r for r in rows if "gather" in r[3]]
    last_end = max((r[0] + r[1] for r in rows), default=0.0)
    summary: dict[str, object] = {
        "ctx": ctx,
        "chunk": chunk,
        "step": step,
        "host_return_us": round(host_end, 1),
        "first_gather_start_us": round(gathers[0][0], 1) if gathers else None,
        "last_gather_end_us": round(max(r[0] + r[1] for r in gathers), 1) if gathers else None,
        "gather_busy_us": round(sum(r[1] for r in gathers), 1),
        "last_kernel_end_us": round(last_end, 1),
        "kernels": len(rows),
        **host,
    }
    print(json.dumps(summary), flush=True)
    for start, dur, stream, name in rows:
        print(f"  {start:9.1f} +{dur:8.1f}  s{stream}  {name[:70]}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ctx", type=int, nargs="+", default=[32768])
    ap.add_argument("--chunk", type=int, nargs="+", default=[32768, 8192])
    ap.add_argument("--step", nargs="+", default=["triton", "torch"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__}))
    results = [
        one(ctx, chunk, step, args.out)
        for ctx in args.ctx
        for chunk in args.chunk
        for step in args.step
        if chunk <= ctx
    ]
    (args.out / "paged_timeline.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
