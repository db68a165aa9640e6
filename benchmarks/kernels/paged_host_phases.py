"""Host time of each step before the first copy of a CPU-paged decode call is launched.

Replays, in order, what :func:`cpu_paged_attention` does before its first staging launch,
with a clock between steps (no profiler; medians over repeats), then times whole calls.

    PYTHONPATH=src python3 benchmarks/kernels/paged_host_phases.py [ctx] [chunk]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from paged_inputs import BLOCK, DecodeInputs

from servelab.kernels import paged
from servelab.kernels.staging import GatherStrategy, resolve_strategy, stage_blocks


def main() -> int:
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    dev = torch.device("cuda")
    inputs = DecodeInputs.build(ctx, chunk)
    cache, table, gpu, gtable = inputs.cache, inputs.table, inputs.gpu, inputs.gpu_table
    scratch, query = inputs.scratch, inputs.query
    steps: dict[str, list[float]] = {}

    def clock(name: str, t: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append((now - t) * 1e6)
        return now

    for rep in range(60):
        torch.cuda.synchronize()
        t = time.perf_counter()
        chunk_blocks = paged._validate(
            query, cache, table, ctx, gpu, gtable, BLOCK, scratch=scratch, chunk_tokens=None,
            scale=None, window=None, softcap=None, out=None, out_lse=None,
        )  # fmt: skip
        t = clock("validate", t)
        paged._resolve_step("auto", query, cache.dtype)
        t = clock("resolve_step", t)
        strat = resolve_strategy("auto", cache.key, dev)
        t = clock("resolve_strategy", t)
        chunks = paged.plan_chunks(ctx, BLOCK, chunk_blocks)
        t = clock("plan_chunks", t)
        streams = paged._Streams(dev, True)
        t = clock("streams", t)
        ids_host = table[: chunks[-1].block_end].to(torch.int64)
        t = clock("ids_int64", t)
        ids_dev = ids_host.to(dev)
        t = clock("ids_to_device", t)
        streams.copy_waits_compute()
        t = clock("copy_waits_compute", t)
        with streams.on_copy():
            t = clock("enter_copy_stream", t)
            c = chunks[0]
            assert strat is GatherStrategy.GPU_GATHER
            stage_blocks(
                cache.key, cache.value, ids_host[c.block_start : c.block_end],
                scratch.key[0], scratch.value[0], strategy=strat,
                device_ids=ids_dev[c.block_start : c.block_end],
            )  # fmt: skip
            t = clock("first_gather_launch", t)
            streams.record(streams.copy)
            t = clock("record_event", t)
        if rep == 0:
            steps.clear()  # the first pass compiles and warms caches
    out = {k: round(statistics.median(v), 1) for k, v in steps.items()}
    out["sum_to_first_launch"] = round(sum(v for k, v in out.items() if k != "record_event"), 1)
    print(json.dumps({"ctx": ctx, "chunk": chunk, "host_us_median": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
