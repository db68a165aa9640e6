"""Staging alone, three ways, side by side in one run: the pinned copy rate (one contiguous
``copy_``), the CUDA gather (SM loads from mapped pinned memory, csrc/paged_gather.cu) and the
copy engines (one ``cudaMemcpyAsync`` per run of consecutive block ids, issued from C), on
the caller's stream and split over 2 and 4 side streams.

Host KV cache ``[N, 256, 8, 128]`` bf16 pinned (512 KiB per K or V block), a random block
table of ``tokens / 256`` blocks drawn from a pool twice that size, a dense device scratch.
The ways are timed in rotation (so drift hits each alike), each with CUDA events around
the call, ``--reps`` rounds; medians and min–max are printed, GB/s over K+V bytes.

    python benchmarks/kernels/paged_copy_engine.py --out DIR [--tokens 32768 131072] [--reps 9]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from servelab.kernels import cuda_ext, gather_cuda

BLOCK, HKV, HEAD = 256, 8, 128
STREAMS = (2, 4)  # side streams for the split copy-engine ways


def timed(fn: Callable[[], None]) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return float(start.elapsed_time(stop))


def run(tokens: int, reps: int, lib: ctypes.CDLL) -> dict[str, Any]:
    n = tokens // BLOCK
    shape = (2 * n, BLOCK, HKV, HEAD)
    k_src = torch.randn(shape, dtype=torch.bfloat16).pin_memory()
    v_src = torch.randn(shape, dtype=torch.bfloat16).pin_memory()
    ids = torch.randperm(2 * n, generator=torch.Generator().manual_seed(tokens))[:n]
    ids = ids.to(torch.int64).contiguous().pin_memory()
    k_dst = torch.empty((n, BLOCK, HKV, HEAD), dtype=torch.bfloat16, device="cuda")
    v_dst = torch.empty_like(k_dst)
    flat = torch.empty(2 * k_dst.numel(), dtype=torch.bfloat16).pin_memory()
    flat_dst = torch.empty(flat.numel(), dtype=torch.bfloat16, device="cuda")
    block_bytes = BLOCK * HKV * HEAD * 2
    nbytes = 2 * n * block_bytes
    stream = torch.cuda.current_stream()

    def gather() -> None:
        gather_cuda.gather_kv_blocks_from_host(k_src, v_src, ids, k_dst, v_dst)

    def copy_range(lo: int, hi: int, s: torch.cuda.Stream) -> None:
        """Blocks [lo, hi) of the table by the copy engines, issued on ``s``."""
        rc = lib.paged_copy_blocks(
            k_src.data_ptr(), v_src.data_ptr(),
            k_dst.data_ptr() + lo * block_bytes, v_dst.data_ptr() + lo * block_bytes,
            ids.data_ptr() + 8 * lo, hi - lo, block_bytes, block_bytes, block_bytes, block_bytes,
            ctypes.c_void_p(s.cuda_stream),
        )  # fmt: skip
        cuda_ext.check(lib, rc, "paged_copy_blocks")

    side = [torch.cuda.Stream() for _ in range(max(STREAMS))]

    def engines_on(n_streams: int) -> Callable[[], None]:
        """The block copies split into ``n_streams`` contiguous ranges, one side stream each
        (forked from and joined back into the caller's stream): copies in flight at once, so
        one copy's fixed cost hides behind another's transfer."""

        def go() -> None:
            cuts = [n * i // n_streams for i in range(n_streams + 1)]
            for i, s in enumerate(side[:n_streams]):
                s.wait_stream(stream)
                copy_range(cuts[i], cuts[i + 1], s)
            for s in side[:n_streams]:
                stream.wait_stream(s)

        return go

    ways: dict[str, Callable[[], None]] = {
        "copy_rate": lambda: flat_dst.copy_(flat, non_blocking=True),
        "cuda_gather": gather,
        "copy_engines": lambda: copy_range(0, n, stream),
    }
    for n_streams in STREAMS:
        ways[f"copy_engines_{n_streams}s"] = engines_on(n_streams)
    for fn in ways.values():  # warm-up (builds, first touches)
        fn()
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            times[name].append(timed(fn))
    for name, fn in ways.items():  # every way lands the right bytes (poisoned first)
        if name == "copy_rate":
            continue
        k_dst.fill_(float("nan"))
        v_dst.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        for i in (0, n // 2, n - 1):
            assert torch.equal(k_dst[i].cpu(), k_src[int(ids[i])]), (name, "K", i)
            assert torch.equal(v_dst[i].cpu(), v_src[int(ids[i])]), (name, "V", i)
    out: dict[str, Any] = {"tokens": tokens, "blocks": n, "bytes": nbytes}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "ms_median": med,
            "ms_min": min(ts),
            "ms_max": max(ts),
            "GBps_median": nbytes / med / 1e6,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not cuda_ext.enabled(dev):
        print("needs a CUDA device and nvcc", file=sys.stderr)
        return 2
    lib = gather_cuda.launcher(dev).lib
    lib.paged_copy_blocks.restype = ctypes.c_int
    vp, ll = ctypes.c_void_p, ctypes.c_longlong
    lib.paged_copy_blocks.argtypes = [vp, vp, vp, vp, vp, ll, ll, ll, ll, ll, vp]
    meta = {
        "card": torch.cuda.get_device_name(0),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "shape": f"bf16, {BLOCK}-token blocks, {HKV} KV heads, head {HEAD}, random table",
    }
    results = [run(t, args.reps, lib) for t in args.tokens]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paged_copy_engine.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1)
    )
    print(json.dumps(meta))
    names = [k for k in results[0] if isinstance(results[0][k], dict) and k != "copy_rate"]
    print("| tokens | copy rate GB/s | " + " | ".join(f"{k} GB/s (%)" for k in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in results:
        rate = r["copy_rate"]["GBps_median"]
        cells = [f"{r[k]['GBps_median']:.1f} ({100 * r[k]['GBps_median'] / rate:.0f} %)"
                 for k in names]  # fmt: skip
        print(f"| {r['tokens']} | {rate:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
