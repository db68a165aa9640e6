"""Host time of each step before the first copy of a CPU-paged decode call is launched.

Replays, in order, what :func:`cpu_paged_attention` does before its first staging launch,
with a clock between steps (no profiler; medians over repeats), once per way: the
``gpu_gather`` strategy with its ``triton`` kernel (ids copied to the device, the launch
inside a copy-stream context) and its ``cuda`` kernel (ids written to the scratch's pinned
ring, a ctypes launch on the copy stream's handle), and ``copy_batch`` (the host ids as they
are, one ctypes call enqueuing the copy engines' batch on the copy stream's handle).
``check`` is the call's checks as a repeated call runs them (layout checks remembered by the
scratch); ``validate_full`` beside it is the full check a first call runs. Then times whole
calls (host issue time, launches enqueued, not finished) with each kernel.

    PYTHONPATH=src python3 benchmarks/kernels/paged_host_phases.py [ctx] [chunk]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from paged_inputs import BLOCK, DecodeInputs

from servelab.kernels import gather_cuda, paged_checks, paged_pipeline, paged_plan
from servelab.kernels.staging import GatherKernel, stage_blocks

REPS = 60


def _phases(inputs: DecodeInputs, way: str) -> dict[str, float]:
    strategy = "copy_batch" if way == "copy_batch" else "gpu_gather"
    kernel = GatherKernel.CUDA if way == "cuda" else GatherKernel.TRITON
    ctx, dev, scratch = inputs.ctx, torch.device("cuda"), inputs.scratch
    cache, table = inputs.cache, inputs.table
    args = paged_checks.CallArgs(
        inputs.query, cache, table, ctx, inputs.gpu, inputs.gpu_table, BLOCK, scratch, None,
        None, None, None, inputs.out, inputs.lse,
    )  # fmt: skip
    steps: dict[str, list[float]] = {}

    def clock(name: str, t: int) -> int:
        now = time.perf_counter_ns()
        steps.setdefault(name, []).append((now - t) / 1e3)
        return now

    for rep in range(REPS):
        torch.cuda.synchronize()
        t = time.perf_counter_ns()
        paged_checks.validate(args)
        t = clock("validate_full", t)  # not on the path of a repeated call: left out of sum
        chunk_blocks, checked = paged_checks.check_call(
            args, paged_checks.PagedOptions(strategy, gather_kernel=kernel.value)
        )
        t = clock("check", t)
        assert checked.strategy.value == strategy
        chunks = paged_plan.plan_chunks(ctx, BLOCK, chunk_blocks)
        t = clock("plan_chunks", t)
        streams = paged_pipeline.Streams(dev, True)
        t = clock("streams", t)
        c = chunks[0]
        if strategy == "copy_batch" or kernel is GatherKernel.CUDA:
            # Both ways through the C library: the copy stream's handle, no stream switch.
            slot = None
            if strategy == "copy_batch":  # the host ids as they are, read during the call
                ids_host = table[: chunks[-1].block_end].to(torch.int64).contiguous()
                t = clock("ids_int64", t)
            else:  # the CUDA gather reads its ids from the pinned ring when it runs
                n_ids = chunks[-1].block_end
                slot, buf = scratch.id_ring.acquire(n_ids)
                ids_host = buf[:n_ids]
                ids_host.copy_(table[:n_ids])
                t = clock("ids_to_pinned_ring", t)
            streams.copy_waits_compute()
            t = clock("copy_waits_compute", t)
            stage_blocks(
                cache.key, cache.value, ids_host[c.block_start : c.block_end],
                scratch.key[0], scratch.value[0], strategy=checked.strategy,
                kernel=kernel, stream=streams.copy,
            )  # fmt: skip
            t = clock("first_gather_launch", t)
            event = streams.record(streams.copy)
            if slot is not None:
                scratch.id_ring.guard(slot, event)
            t = clock("record_event", t)
        else:
            ids_host = table[: chunks[-1].block_end].to(torch.int64)
            t = clock("ids_int64", t)
            ids_dev = ids_host.to(dev)
            t = clock("ids_to_device", t)
            streams.copy_waits_compute()
            t = clock("copy_waits_compute", t)
            with streams.on_copy():
                t = clock("enter_copy_stream", t)
                stage_blocks(
                    cache.key, cache.value, ids_host[c.block_start : c.block_end],
                    scratch.key[0], scratch.value[0], strategy=checked.strategy,
                    device_ids=ids_dev[c.block_start : c.block_end],
                )  # fmt: skip
                t = clock("first_gather_launch", t)
                streams.record(streams.copy)
                t = clock("record_event", t)
            clock("leave_copy_stream", t)
        if rep == 0:
            steps.clear()  # the first pass compiles and warms caches
    out = {k: round(statistics.median(v), 1) for k, v in steps.items()}
    skip = ("validate_full", "record_event", "leave_copy_stream")
    out["sum_to_first_launch"] = round(sum(v for k, v in out.items() if k not in skip), 1)
    return out


def _issue_us(fn: Callable[[], None], reps: int = 30) -> float:
    """Median host time to return from a whole call (launches enqueued, not finished)."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t) / 1e3)
    torch.cuda.synchronize()
    return round(statistics.median(times), 1)


def main() -> int:
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    inputs = DecodeInputs.build(ctx, chunk)
    ways = ["triton"]
    dev = torch.device("cuda")
    if gather_cuda.available(inputs.cache.key, dev):
        ways.append("cuda")
    else:
        print("CUDA gather unavailable (no nvcc?): Triton only", file=sys.stderr)
    if gather_cuda.copy_batch_available(inputs.cache.key, dev):
        ways.append("copy_batch")
    result: dict[str, object] = {"ctx": ctx, "chunk": chunk}
    for way in ways:
        result[f"host_us_median_{way}"] = _phases(inputs, way)
        kw = (
            {"strategy": way}
            if way == "copy_batch"
            else {"strategy": "gpu_gather", "gather_kernel": way}
        )
        result[f"call_issue_us_{way}"] = _issue_us(lambda kw=kw: inputs.call(**kw))  # type: ignore[misc]
    print(json.dumps(result))
    cells = []
    for way in ways:
        ph = result[f"host_us_median_{way}"]
        assert isinstance(ph, dict)
        cells.append(
            f"{way}: to first launch {ph['sum_to_first_launch']:.0f} us (check "
            f"{ph['check']:.0f}, full validate {ph['validate_full']:.0f}, launch "
            f"{ph['first_gather_launch']:.0f}), whole call issue "
            f"{result[f'call_issue_us_{way}']:.0f} us"
        )
    print(f"HOST ctx {ctx // 1024}K chunk {chunk // 1024}K | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
