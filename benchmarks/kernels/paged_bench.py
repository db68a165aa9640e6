"""Benchmarks for CPU-paged attention: link rate, gather strategies, staged decode attention.

Run on a CUDA machine (figures are meaningless elsewhere)::

    PYTHONPATH=src python3 benchmarks/kernels/paged_bench.py --out DIR [--quick]

It prints a table last and writes ``paged_bench.json`` and ``paged_bench.md`` under DIR.
``--steps`` compares the torch and Triton chunk steps, ``--batch`` the copy engines' batch
against the CUDA gather (``benchmarks/kernels/gpu.sh paged`` wraps it for the device tool).
Every figure carries the card, the date and the command. Timing: CUDA events on the
caller's stream around whole calls (the copy stream is joined by the compute stream before
the end event), warm-up runs first, the median of the repeats reported with min and max.

Figures
- ``h2d_pinned``/``h2d_pageable``/``d2h_pinned``: one ``copy_`` of N bytes.
- ``gather``: staging one chunk of scattered blocks only (no attention), per strategy.
- ``decode``: :func:`cpu_paged_attention` for one query token over ``ctx`` host tokens plus
  a one-block device suffix; ``effective GB/s`` = host K+V bytes / wall time.
- ``stage_only``/``compute_only``: the same chunk loop with only the copies, or only the
  attention over device-resident chunks, to show how much of the two overlaps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from servelab.kernels import attention as step_new
from servelab.kernels.attention import finalize, new_state
from servelab.kernels.paged import cpu_paged_attention, plan_chunks
from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.staging import (
    GatherKernel,
    GatherStrategy,
    StagingScratch,
    resolve_gather_kernel,
    stage_blocks,
)

GB = 1e9
MiB = 1 << 20
HKV, HEAD, GQA = 8, 128, 8
DTYPE = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    params: dict[str, Any]
    median_ms: float
    min_ms: float
    max_ms: float
    bytes_moved: int
    reps: int

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.median_ms * 1e-3) / GB if self.bytes_moved else math.nan


def time_cuda(fn: Callable[[], object], reps: int, warmup: int = 2, calls: int = 1) -> list[float]:
    """Milliseconds per call, CUDA events on the current stream around ``calls`` calls, per
    repetition. ``calls`` > 1 is the steady state: back-to-back calls, the host issuing call
    i+1 while the device still runs call i, as in a decode loop over layers."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return times


def figure(name: str, params: dict[str, Any], times: list[float], nbytes: int) -> Figure:
    return Figure(
        name, params, statistics.median(times), min(times), max(times), nbytes, len(times)
    )


def _copy_figure(name: str, dst: torch.Tensor, src: torch.Tensor, reps: int) -> Figure:
    times = time_cuda(lambda: dst.copy_(src, non_blocking=True), reps)
    return figure(name, {"bytes": src.numel()}, times, src.numel())


def bench_copies(sizes: list[int], reps: int) -> list[Figure]:
    out = []
    for size in sizes:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True).random_(0, 256)
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")
        r = reps if size < 256 * MiB else max(5, reps // 4)
        out.append(_copy_figure("h2d_pinned", dev, host, r))
        if size in (2 * MiB, 256 * MiB):
            out.append(_copy_figure("d2h_pinned", host, dev, r))
            pageable = torch.empty(size, dtype=torch.uint8).random_(0, 256)
            out.append(_copy_figure("h2d_pageable", dev, pageable, r))
    return out


@dataclasses.dataclass(frozen=True)
class HostKV:
    """Pinned token-major K and V ``[tokens, HKV, HEAD]``; any block size is a view."""

    key: torch.Tensor
    value: torch.Tensor

    @classmethod
    def allocate(cls, tokens: int) -> HostKV:
        k = torch.empty(tokens, HKV, HEAD, dtype=DTYPE, pin_memory=True)
        v = torch.empty(tokens, HKV, HEAD, dtype=DTYPE, pin_memory=True)
        # Random data, never zeros; a 64 MiB random pattern tiled keeps setup fast.
        pattern = torch.randn(64 * MiB // 2, generator=torch.Generator().manual_seed(0))
        pattern = pattern.to(DTYPE)
        for t in (k, v):
            flat = t.view(-1)
            for off in range(0, flat.numel(), pattern.numel()):
                n = min(pattern.numel(), flat.numel() - off)
                flat[off : off + n].copy_(pattern[:n])
        return cls(k, v)

    def cache(self, block: int) -> PagedKVCache:
        n = self.key.shape[0] // block
        shape = (n, block, HKV, HEAD)
        return PagedKVCache(
            key=self.key[: n * block].view(shape), value=self.value[: n * block].view(shape)
        )


def kv_bytes(tokens: int) -> int:
    return 2 * tokens * HKV * HEAD * torch.empty(0, dtype=DTYPE).element_size()


def random_table(num_blocks: int, used: int, seed: int) -> torch.Tensor:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:used]


def bench_gather(
    host: HostKV, block: int, chunk_tokens: int, reps: int, triton_sweep: bool
) -> list[Figure]:
    """Stage one chunk of scattered blocks, per strategy (no attention)."""
    cache = host.cache(block)
    nb = chunk_tokens // block
    dev = torch.device("cuda")
    scratch = StagingScratch.allocate(
        chunk_blocks=nb,
        block_size=block,
        num_kv_heads=HKV,
        head_size=HEAD,
        dtype=DTYPE,
        device=dev,
        buffers=1,
        with_pack=True,
    )
    nbytes = kv_bytes(nb * block)
    out = []
    for table_kind in ("random", "contiguous"):
        ids = (
            random_table(cache.num_blocks, nb, 1)
            if table_kind == "random"
            else torch.arange(nb) + cache.num_blocks // 3
        )
        ids_dev = ids.to(dev)
        for strategy in GatherStrategy:
            if strategy is GatherStrategy.AUTO:
                continue
            if table_kind == "contiguous" and strategy not in (
                GatherStrategy.COALESCED,
                GatherStrategy.GPU_GATHER,
            ):
                continue

            def run(
                s: GatherStrategy = strategy,
                ids: torch.Tensor = ids,
                ids_dev: torch.Tensor = ids_dev,
            ) -> None:
                stage_blocks(
                    cache.key,
                    cache.value,
                    ids,
                    scratch.key[0],
                    scratch.value[0],
                    strategy=s,
                    device_ids=ids_dev,
                    pack_key=scratch.pack_key[0] if scratch.pack_key is not None else None,
                    pack_value=scratch.pack_value[0] if scratch.pack_value is not None else None,
                )

            r = (
                reps
                if strategy is not GatherStrategy.PER_BLOCK or block >= 64
                else max(3, reps // 3)
            )
            params = {
                "block": block,
                "chunk_tokens": nb * block,
                "table": table_kind,
                "strategy": strategy.value,
            }
            out.append(figure("gather", params, time_cuda(run, r), nbytes))
        if triton_sweep and table_kind == "random":
            from servelab.kernels.gather_triton import gather_kv_blocks_from_host

            for tile, programs, warps in (
                (16384, 16, 4),
                (16384, 32, 4),
                (16384, 128, 4),
                (16384, 1 << 20, 4),
                (65536, 128, 8),
            ):

                def run_t(
                    tile: int = tile,
                    programs: int = programs,
                    warps: int = warps,
                    ids_dev: torch.Tensor = ids_dev,
                ) -> None:
                    gather_kv_blocks_from_host(
                        cache.key,
                        cache.value,
                        ids_dev,
                        scratch.key[0, :nb],
                        scratch.value[0, :nb],
                        tile_bytes=tile,
                        programs=programs,
                        num_warps=warps,
                    )

                params = {
                    "block": block,
                    "chunk_tokens": nb * block,
                    "table": "random",
                    "strategy": "gpu_gather",
                    "tile": tile,
                    "programs": programs,
                    "warps": warps,
                }
                out.append(figure("gather_sweep", params, time_cuda(run_t, reps), nbytes))
    return out


def bench_decode(
    host: HostKV,
    ctx: int,
    block: int,
    strategy: str,
    overlap: bool,
    chunk_tokens: int,
    reps: int,
    *,
    programs: int | None = None,
    chunk_step: str = "auto",
    steady: bool = False,
    gather_kernel: str = "auto",
) -> Figure:
    cache = host.cache(block)
    dev = torch.device("cuda")
    used = ctx // block
    table = random_table(cache.num_blocks, used, 2)
    gen = torch.Generator().manual_seed(3)
    gpu_len = block
    gpu = PagedKVCache.allocate(
        num_blocks=4, block_size=block, num_kv_heads=HKV, head_size=HEAD, dtype=DTYPE, device=dev
    )
    gpu.key.copy_(torch.randn(gpu.key.shape, generator=gen).to(DTYPE))
    gpu.value.copy_(torch.randn(gpu.value.shape, generator=gen).to(DTYPE))
    gtable = torch.tensor([2])
    query = torch.randn(1, HKV * GQA, HEAD, generator=gen).to(DTYPE).to(dev)
    scratch = StagingScratch.allocate(
        chunk_blocks=chunk_tokens // block,
        block_size=block,
        num_kv_heads=HKV,
        head_size=HEAD,
        dtype=DTYPE,
        device=dev,
        with_pack=strategy == "cpu_pack",
    )
    out = torch.empty_like(query)
    lse = torch.empty(1, HKV * GQA, dtype=torch.float32, device=dev)

    def run() -> None:
        cpu_paged_attention(
            query,
            cache,
            table,
            ctx,
            gpu,
            gtable,
            gpu_len,
            scratch=scratch,
            strategy=strategy,
            overlap=overlap,
            gather_programs=programs,
            gather_kernel=gather_kernel,
            step=chunk_step,
            out=out,
            out_lse=lse,
        )

    times = time_cuda(run, max(3, reps // 2), calls=8) if steady else time_cuda(run, reps)
    issue = host_issue_ms(run)
    params = {
        "chunk_step": chunk_step,
        "host_issue_ms": round(issue, 3),
        "programs": programs,
        "gather_kernel": gather_kernel,
        "ctx": ctx,
        "block": block,
        "strategy": strategy,
        "overlap": overlap,
        "chunk_tokens": chunk_tokens,
        "q_heads": HKV * GQA,
        "kv_heads": HKV,
        "head": HEAD,
        "suffix": gpu_len,
    }
    return figure("decode_steady" if steady else "decode", params, times, kv_bytes(ctx))


def bench_split(
    host: HostKV,
    ctx: int,
    block: int,
    chunk_tokens: int,
    reps: int,
    *,
    programs: int | None = None,
    with_compute: bool = True,
    kernel: str = "auto",
    strategy: GatherStrategy = GatherStrategy.GPU_GATHER,
) -> list[Figure]:
    """The decode chunk loop with only the staging (gpu_gather, ``kernel`` as the call's
    ``gather_kernel``, or copy_batch on a side stream joined by the caller's, as the call
    does) or only the attention."""
    cache = host.cache(block)
    dev = torch.device("cuda")
    table = random_table(cache.num_blocks, ctx // block, 2)
    ids_dev = table.to(dev)
    gkernel = resolve_gather_kernel(kernel, cache.key, dev)
    ids_src = table.pin_memory() if gkernel is GatherKernel.CUDA else table
    nb = chunk_tokens // block
    scratch = StagingScratch.allocate(
        chunk_blocks=nb, block_size=block, num_kv_heads=HKV, head_size=HEAD, dtype=DTYPE, device=dev
    )
    chunks = plan_chunks(ctx, block, nb)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    batch = strategy is GatherStrategy.COPY_BATCH

    def stage_only() -> None:
        if batch:
            side.wait_stream(torch.cuda.current_stream())
        for i, c in enumerate(chunks):
            slot = i % 2
            stage_blocks(
                cache.key,
                cache.value,
                (table if batch else ids_src)[c.block_start : c.block_end],
                scratch.key[slot],
                scratch.value[slot],
                strategy=strategy,
                device_ids=ids_dev[c.block_start : c.block_end],
                programs=programs,
                kernel=gkernel,
                stream=side if batch else None,
            )
        if batch:
            torch.cuda.current_stream().wait_stream(side)

    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, HKV * GQA, HEAD, generator=gen).to(DTYPE).to(dev)
    k_dev = torch.randn(min(ctx, 2 * chunk_tokens), HKV, HEAD, generator=gen).to(DTYPE).to(dev)
    v_dev = torch.randn_like(k_dev)

    def compute_only() -> None:
        pq = step_new.prepare_query(query, HEAD**-0.5, HKV)
        state = new_state(HKV, pq.rows, HEAD, dev)
        for c in chunks:
            n = c.token_end - c.token_start
            off = c.token_start % (k_dev.shape[0] - n + 1)
            state = step_new.accumulate(
                state,
                pq,
                k_dev[off : off + n],
                v_dev[off : off + n],
                num_q=1,
                q_start=ctx,
                k_start=c.token_start,
                causal=True,
                window=None,
                softcap=None,
            )
        finalize(state, 1)

    params: dict[str, Any] = {"ctx": ctx, "block": block, "chunk_tokens": chunk_tokens}
    figs = [
        figure(
            "stage_only",
            {
                **params,
                "programs": programs,
                "gather_kernel": gkernel.value,
                "strategy": strategy.value,
            },
            time_cuda(stage_only, reps),
            kv_bytes(ctx),
        )
    ]
    if with_compute:
        figs.append(figure("compute_only", params, time_cuda(compute_only, reps), 0))
    return figs


def host_issue_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Median host time to return from one call (the launches issued, not finished)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def check_decode_accuracy(
    host: HostKV, ctx: int, block: int, chunk_step: str = "auto", strategy: str = "auto"
) -> dict[str, Any]:
    """One 32K decode against the float64 reference (sanity beside the pytest suite)."""
    from servelab.kernels.reference import reference_attention
    from servelab.kernels.tolerance import check_attention

    cache = host.cache(block)
    dev = torch.device("cuda")
    table = random_table(cache.num_blocks, ctx // block, 5)
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(1, HKV * GQA, HEAD, generator=gen).to(DTYPE)
    gpu = PagedKVCache.allocate(
        num_blocks=1, block_size=block, num_kv_heads=HKV, head_size=HEAD, dtype=DTYPE, device=dev
    )
    ksuf = torch.randn(block, HKV, HEAD, generator=gen).to(DTYPE)
    vsuf = torch.randn(block, HKV, HEAD, generator=gen).to(DTYPE)
    gpu.key[0].copy_(ksuf)
    gpu.value[0].copy_(vsuf)
    scratch = StagingScratch.allocate(
        chunk_blocks=8192 // block,
        block_size=block,
        num_kv_heads=HKV,
        head_size=HEAD,
        dtype=DTYPE,
        device=dev,
    )
    out, lse = cpu_paged_attention(
        query.to(dev),
        cache,
        table,
        ctx,
        gpu,
        torch.tensor([0]),
        block,
        scratch=scratch,
        step=chunk_step,
        strategy=strategy,
    )
    k_host, v_host = cache.read(table, ctx)
    k_all = torch.cat([k_host, ksuf])
    v_all = torch.cat([v_host, vsuf])
    ref, ref_lse = reference_attention(query, k_all, v_all, causal=True)
    lowp, _ = reference_attention(query, k_all, v_all, causal=True, upcast=False)
    rep = check_attention(out, ref, lowp, dtype=DTYPE, lse=lse, lse_ref=ref_lse)
    return {
        "ctx": ctx,
        "block": block,
        "chunk_step": chunk_step,
        "strategy": strategy,
        "ok": rep.ok,
        "explain": rep.explain(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton gather's knobs")
    ap.add_argument(
        "--steps",
        action="store_true",
        help="only the torch vs Triton chunk step, side by side, at 32K-512K",
    )
    ap.add_argument(
        "--batch",
        action="store_true",
        help="only the copy engines' batch (copy_batch) against the CUDA gather at 32K-512K",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("paged_bench needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {
        "card": torch.cuda.get_device_name(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "mm_out_dtype": step_new._HAS_OUT_DTYPE,
        "gather_kernel": resolve_gather_kernel(
            "auto", torch.empty(1, 1, 1, 1, pin_memory=True), torch.device("cuda")
        ).value,
    }
    print(json.dumps(env), flush=True)
    reps = 5 if args.quick else 10
    if args.steps:
        return run_rows(args.out, env, reps, t0, "paged_steps", STEPS_STAGES, STEPS_CONFIGS)
    if args.batch:
        return run_rows(args.out, env, reps, t0, "paged_batch", BATCH_STAGES, BATCH_CONFIGS)
    figs: list[Figure] = []
    sizes = [64 << 10, 256 << 10, 2 * MiB, 16 * MiB, 256 * MiB, 1024 * MiB]
    figs += bench_copies(sizes, reps=reps * 2)
    _progress(figs, t0)
    max_ctx = 512 * 1024
    host = HostKV.allocate(max_ctx + 4096)
    print(f"host cache ready {time.perf_counter() - t0:.1f}s", flush=True)
    accuracy = [
        check_decode_accuracy(host, 32 * 1024, 256),
        check_decode_accuracy(host, 32 * 1024, 16),
    ]
    print(json.dumps(accuracy), flush=True)
    for block in (16, 256):
        figs += bench_gather(host, block, 8192, reps, triton_sweep=args.sweep)
    _progress(figs, t0)
    for ctx in (32 * 1024, 128 * 1024, 512 * 1024):
        r = reps if ctx < max_ctx else max(5, reps // 2)
        few = max(3, r // 3)
        for chunk in (8192, 16384, 32768):
            figs.append(bench_decode(host, ctx, 256, "auto", True, chunk, r))
        figs.append(bench_decode(host, ctx, 256, "auto", False, 32768, r))
        for chunk in (8192, 32768):
            figs.append(bench_decode(host, ctx, 16, "auto", True, chunk, r))
        if ctx <= 128 * 1024:
            figs.append(bench_decode(host, ctx, 256, "coalesced", True, 32768, few))
        if ctx == 32 * 1024:
            figs.append(bench_decode(host, ctx, 16, "coalesced", True, 8192, few))
            figs.append(bench_decode(host, ctx, 256, "cpu_pack", True, 8192, few))
        for chunk in (8192, 32768):
            figs += bench_split(host, ctx, 256, chunk, r)
        _progress(figs, t0)
    copy_rate = max(
        f.gbps for f in figs if f.name == "h2d_pinned" and f.params["bytes"] >= 16 * MiB
    )
    print(save_run(args.out, "paged_bench", env, copy_rate, accuracy, figs))
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


def save_run(
    out_dir: Path,
    stem: str,
    env: dict[str, Any],
    copy_rate: float,
    accuracy: list[dict[str, Any]],
    figs: list[Figure],
) -> str:
    """Write ``stem.json`` (every figure, the environment, the accuracy checks) and the
    rendered table ``stem.md``; return the table."""
    payload = {
        "env": env,
        "copy_rate_gbps": copy_rate,
        "accuracy": accuracy,
        "figures": [dict(dataclasses.asdict(f), gbps=f.gbps) for f in figs],
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    table = render(figs, env, copy_rate)
    (out_dir / f"{stem}.md").write_text(table)
    return table


MAX_CTX = 512 * 1024


def _copy_rate_and_host(reps: int, t0: float) -> tuple[list[Figure], float, HostKV]:
    """The run's pinned copy figures and rate, and a pinned host cache for every context."""
    figs = bench_copies([256 * MiB, 1024 * MiB], reps=reps)
    copy_rate = max(f.gbps for f in figs if f.name == "h2d_pinned")
    host = HostKV.allocate(MAX_CTX + 4096)
    print(f"host cache ready {time.perf_counter() - t0:.1f}s", flush=True)
    return figs, copy_rate, host


# A decode row: key, block, chunk step, chunk tokens, steady state (back-to-back calls),
# staging strategy, gather kernel.
Config = tuple[str, int, str, int, bool, str, str]
# A staging-only row: key, chunk tokens, strategy, gather kernel.
Stage = tuple[str, int, GatherStrategy, str]

STEPS_STAGES: list[Stage] = [
    ("stage_c32k", 32768, GatherStrategy.GPU_GATHER, "auto"),
    ("stage_c8k", 8192, GatherStrategy.GPU_GATHER, "auto"),
    ("stage_c32k_tgather", 32768, GatherStrategy.GPU_GATHER, "triton"),
]
STEPS_CONFIGS: list[Config] = [
    ("torch_c32k", 256, "torch", 32768, False, "gpu_gather", "auto"),
    ("triton_c32k", 256, "triton", 32768, False, "gpu_gather", "auto"),
    ("triton_c16k", 256, "triton", 16384, False, "gpu_gather", "auto"),
    ("triton_c8k", 256, "triton", 8192, False, "gpu_gather", "auto"),
    ("triton_bs16_c8k", 16, "triton", 8192, False, "gpu_gather", "auto"),
    ("torch_c32k_steady", 256, "torch", 32768, True, "gpu_gather", "auto"),
    ("triton_c32k_steady", 256, "triton", 32768, True, "gpu_gather", "auto"),
    ("triton_c8k_steady", 256, "triton", 8192, True, "gpu_gather", "auto"),
    ("triton_c32k_tgather", 256, "triton", 32768, False, "gpu_gather", "triton"),
]
# The copy engines' batch (copy_batch) against the CUDA gather, Triton step, one run.
BATCH_STAGES: list[Stage] = [
    ("stage_gather_c32k", 32768, GatherStrategy.GPU_GATHER, "cuda"),
    ("stage_batch_c32k", 32768, GatherStrategy.COPY_BATCH, "auto"),
    ("stage_batch_c8k", 8192, GatherStrategy.COPY_BATCH, "auto"),
]
BATCH_CONFIGS: list[Config] = [
    ("gather_c32k", 256, "triton", 32768, False, "gpu_gather", "cuda"),
    ("batch_c32k", 256, "triton", 32768, False, "copy_batch", "auto"),
    ("batch_c16k", 256, "triton", 16384, False, "copy_batch", "auto"),
    ("batch_c8k", 256, "triton", 8192, False, "copy_batch", "auto"),
    ("batch_c4k", 256, "triton", 4096, False, "copy_batch", "auto"),
    ("batch_bs16_c8k", 16, "triton", 8192, False, "copy_batch", "auto"),
    ("gather_bs16_c8k", 16, "triton", 8192, False, "gpu_gather", "cuda"),
    ("batch_bs32_c8k", 32, "triton", 8192, False, "copy_batch", "auto"),
    ("gather_bs32_c8k", 32, "triton", 8192, False, "gpu_gather", "cuda"),
    ("batch_bs64_c8k", 64, "triton", 8192, False, "copy_batch", "auto"),
    ("gather_bs64_c8k", 64, "triton", 8192, False, "gpu_gather", "cuda"),
    ("gather_c32k_steady", 256, "triton", 32768, True, "gpu_gather", "cuda"),
    ("batch_c32k_steady", 256, "triton", 32768, True, "copy_batch", "auto"),
    ("batch_c8k_steady", 256, "triton", 8192, True, "copy_batch", "auto"),
]


def run_rows(
    out_dir: Path,
    env: dict[str, Any],
    reps: int,
    t0: float,
    stem: str,
    stages: list[Stage],
    configs: list[Config],
) -> int:
    """Staging-only and decode rows at 32K, 128K and 512K host tokens, side by side in one
    run, each row judged against a copy rate measured right before it; ``stem``.json/.md and
    ``stem``_summary.md under ``out_dir``."""
    figs, copy_rate, host = _copy_rate_and_host(reps, t0)
    max_ctx = MAX_CTX
    strategies = sorted({c[5] for c in configs})
    accuracy = [
        check_decode_accuracy(host, 32 * 1024, block, step, strategy)
        for step in sorted({c[2] for c in configs})
        for block in (256, 16)
        for strategy in strategies
    ]
    print(json.dumps(accuracy), flush=True)
    summary = []
    for ctx in (32 * 1024, 128 * 1024, 512 * 1024):
        r = reps if ctx < max_ctx else max(5, reps // 2)
        # The link rate drifts within a run on these shared machines (up to ~10% seen):
        # each row is judged against a copy rate measured right before it.
        row_copies = bench_copies([256 * MiB, 1024 * MiB], reps=reps)
        figs += row_copies
        row: dict[str, Any] = {"ctx": ctx, "copy_rate": max(f.gbps for f in row_copies)}
        for key, chunk, strategy, kernel in stages:
            f = bench_split(
                host,
                ctx,
                256,
                chunk,
                r,
                programs=32,
                with_compute=False,
                kernel=kernel,
                strategy=strategy,
            )[0]
            figs.append(f)
            row[key] = f
        for key, block, step, chunk, steady, strat, kernel in configs:
            f = bench_decode(
                host, ctx, block, strat, True, chunk, r, programs=32, chunk_step=step,
                steady=steady, gather_kernel=kernel,
            )  # fmt: skip
            figs.append(f)
            row[key] = f
        summary.append(row)
        _progress(figs, t0)
    save_run(out_dir, stem, env, copy_rate, accuracy, figs)
    keys = [s[0] for s in stages] + [c[0] for c in configs]
    lines = [
        f"SUMMARY card {env['card']} {env['date_utc']} copy rate {copy_rate:.1f} GB/s; "
        "decode ms (% of the copy rate measured just before the row) [host issue ms]; bf16, "
        "8 KV / 64 q heads, d 128, 1 query token, random table, gather 32 programs, bs256 "
        "unless named; rows and their strategy / gather kernel in "
        f"benchmarks/kernels/paged_bench.py ({stem})",
        "| ctx | row copy GB/s | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for row in summary:
        cells = []
        rate = row["copy_rate"]
        for k in keys:
            f = row[k]
            issue = f.params.get("host_issue_ms")
            extra = f" [{issue:.2f}]" if issue is not None else ""
            cells.append(f"{f.median_ms:.2f} ({100 * f.gbps / rate:.0f}%){extra}")
        lines.append(f"| {row['ctx'] // 1024}K | {rate:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out_dir / f"{stem}_summary.md").write_text(text)
    print(json.dumps(accuracy))
    print(text)
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def _progress(figs: list[Figure], t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {len(figs)} figures", flush=True)


def render(figs: list[Figure], env: dict[str, Any], copy_rate: float) -> str:
    lines = [
        f"card {env['card']}, {env['date_utc']}, torch {env['torch']}, triton {env['triton']}",
        f"command: {env['command']}",
        f"measured pinned H2D copy rate (best of >= 16 MiB): {copy_rate:.1f} GB/s",
        "",
        "| figure | params | median ms | min-max ms | GB/s | % of copy rate |",
        "|---|---|---|---|---|---|",
    ]
    for f in figs:
        pct = f"{100 * f.gbps / copy_rate:.0f}%" if f.bytes_moved else ""
        gbps = f"{f.gbps:.1f}" if f.bytes_moved else ""
        params = ", ".join(f"{k}={v}" for k, v in f.params.items())
        lines.append(
            f"| {f.name} | {params} | {f.median_ms:.3f} | {f.min_ms:.3f}-{f.max_ms:.3f}"
            f" | {gbps} | {pct} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
