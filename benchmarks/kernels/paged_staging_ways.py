"""Staging paths against the library's CUDA gather, side by side in one run (staging alone).

Ways (host KV cache ``[N, block, 8, 128]`` bf16 pinned, 512 KiB per K or V block at the
default 256-token block, a random block table of ``tokens / block`` blocks from a pool twice
that size, dense device scratch):

- ``copy_rate``: one contiguous pinned ``copy_`` of the same bytes (the goal's reference);
- ``gather``: the library's CUDA gather (SM loads from mapped pinned memory, 32 CTAs);
- ``*_sorted`` / ``*_seq``: the same way over the table's blocks in ascending order / over
  the first blocks of the pool in order (contiguous host memory);
- ``engines``: the copy engines, one ``cudaMemcpyAsync`` a run of consecutive ids (from C);
  ``engines_Ns``: the same split over N side streams (this script replaced
  ``paged_copy_engine.py`` of runs 11–12 in docs/history/paged-attention.md, whose ways it keeps);
- ``tma_P_S_C``: bulk copies by the Tensor Memory Accelerator (``staging_ways.cu``), pieces
  of P KiB, S pieces in flight a CTA, C CTAs;
- ``batch_F_B``: the library's ``copy_batch`` (the copy engines through
  ``cudaMemcpyBatchAsync``): F copies in the first batch, then batches doubling up to B;
- ``hybrid_X``: the gather over the first (1 - X) of the table on one stream and the copy
  engines (one ``cudaMemcpyAsync`` a block, from C) over the rest on another, at once.

Timed in rotation, CUDA events around each call on the caller's stream (side streams fork
from and join it), ``--reps`` rounds, medians and min–max; GB/s over K+V bytes. Every way's
bytes are checked against the source after poisoning the scratch.

    python benchmarks/kernels/paged_staging_ways.py --out DIR [--tokens 32768 131072] [--reps 7]
        [--blocks 256 ...] [--skip-tma]
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

HKV, HEAD = 8, 128
# copy_batch: (copies in the first batch, the most in one; batches double in between);
# 1 << 20: all in one.
BATCHES = [(1 << 20, 1 << 20), (4, 64), (8, 128), (16, 256), (128, 128), (8, 512)]
TMA = [(32, 4, 8), (32, 4, 16), (32, 6, 16), (16, 4, 16), (64, 3, 16)]
HYBRID = (0.1, 0.2, 0.3)


def timed(fn: Callable[[], None]) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return float(start.elapsed_time(stop))


def libraries(dev: torch.device) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    gl = gather_cuda.launcher(dev).lib
    gl.paged_copy_blocks.restype = i32
    gl.paged_copy_blocks.argtypes = [vp, vp, vp, vp, vp, ll, ll, ll, ll, ll, vp]
    src = Path(__file__).resolve().with_name("staging_ways.cu")
    sw = cuda_ext.build("staging_ways", src, cuda_ext.arch_flag(dev)).lib
    sw.tma_gather_kv.restype = i32
    sw.tma_gather_kv.argtypes = [vp, vp, vp, vp, vp, ll, ll, ll, ll, ll, i32, i32, i32, vp]
    return gl, sw


def run(
    tokens: int, block: int, reps: int, gl: ctypes.CDLL, sw: ctypes.CDLL, use_tma: bool
) -> dict[str, Any]:
    n = tokens // block
    shape = (2 * n, block, HKV, HEAD)
    k_src = torch.randn(shape, dtype=torch.bfloat16).pin_memory()
    v_src = torch.randn(shape, dtype=torch.bfloat16).pin_memory()
    ids = torch.randperm(2 * n, generator=torch.Generator().manual_seed(tokens))[:n]
    # The random table; the same blocks in ascending source order; the first n blocks of the
    # pool in order: does the order of the reads over host memory matter?
    tables = {
        "": ids.to(torch.int64).contiguous().pin_memory(),
        "sorted": ids.sort().values.to(torch.int64).contiguous().pin_memory(),
        "seq": torch.arange(n, dtype=torch.int64).pin_memory(),
    }
    k_dst = torch.empty((n, block, HKV, HEAD), dtype=torch.bfloat16, device="cuda")
    v_dst = torch.empty_like(k_dst)
    flat = torch.empty(2 * k_dst.numel(), dtype=torch.bfloat16).pin_memory()
    flat_dst = torch.empty(flat.numel(), dtype=torch.bfloat16, device="cuda")
    bb = block * HKV * HEAD * 2
    nbytes = 2 * n * bb
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]

    def args(lo: int, hi: int, table: str) -> tuple[int, ...]:
        kd, vd = k_dst.data_ptr() + lo * bb, v_dst.data_ptr() + lo * bb
        t = tables[table]
        return (k_src.data_ptr(), v_src.data_ptr(), kd, vd, t.data_ptr() + 8 * lo, hi - lo,
                bb, bb, bb, bb)  # fmt: skip

    def gather(lo: int, hi: int, s: torch.cuda.Stream, table: str = "") -> None:
        t = tables[table]
        gather_cuda.gather_kv_blocks_from_host(
            k_src, v_src, t[lo:hi], k_dst[lo:hi], v_dst[lo:hi], stream=s
        )

    def engines(lo: int, hi: int, s: torch.cuda.Stream, table: str = "") -> None:
        rc = gl.paged_copy_blocks(*args(lo, hi, table), s.cuda_stream)
        cuda_ext.check(gl, rc, "copy_blocks")

    def tma(piece: int, stages: int, ctas: int, table: str = "") -> Callable[[], None]:
        def go() -> None:
            rc = sw.tma_gather_kv(
                *args(0, n, table), piece * 1024, stages, ctas, stream.cuda_stream
            )
            cuda_ext.check(sw, rc, "tma_gather_kv")

        return go

    def batch(first: int, per_batch: int, table: str = "") -> Callable[[], None]:
        def go() -> None:
            gather_cuda.copy_blocks_batched(
                k_src, v_src, tables[table][:n], k_dst, v_dst, stream=stream, first=first,
                per_batch=per_batch,
            )  # fmt: skip

        return go

    sides = [torch.cuda.Stream() for _ in range(4)]  # type: ignore[no-untyped-call]
    side = sides[0]

    def engines_on(n_streams: int) -> Callable[[], None]:
        """The per-run copies split into ``n_streams`` contiguous ranges, one side stream
        each (forked from and joined back into the caller's stream)."""

        def go() -> None:
            cuts = [n * i // n_streams for i in range(n_streams + 1)]
            for i, s in enumerate(sides[:n_streams]):
                s.wait_stream(stream)
                engines(cuts[i], cuts[i + 1], s)
            for s in sides[:n_streams]:
                stream.wait_stream(s)

        return go

    def hybrid(frac: float) -> Callable[[], None]:
        m = n - round(frac * n)

        def go() -> None:
            side.wait_stream(stream)
            engines(m, n, side)
            gather(0, m, stream)
            stream.wait_stream(side)

        return go

    def copy_rate() -> None:
        flat_dst.copy_(flat, non_blocking=True)

    # name -> (the call, the table whose blocks it lands)
    ways: dict[str, tuple[Callable[[], None], str]] = {
        "copy_rate": (copy_rate, ""),
        "gather": (lambda: gather(0, n, stream), ""),
        "gather_sorted": (lambda: gather(0, n, stream, "sorted"), "sorted"),
        "gather_seq": (lambda: gather(0, n, stream, "seq"), "seq"),
        "engines": (lambda: engines(0, n, stream), ""),
        "engines_sorted": (lambda: engines(0, n, stream, "sorted"), "sorted"),
        "engines_seq": (lambda: engines(0, n, stream, "seq"), "seq"),
        "engines_2s": (engines_on(2), ""),
        "engines_4s": (engines_on(4), ""),
    }
    for first, per in BATCHES:
        ways[f"batch_{first}_{per}"] = (batch(first, per), "")
    ways["batch_sorted"] = (
        batch(gather_cuda.BATCH_FIRST, gather_cuda.BATCH_SIZE, "sorted"),
        "sorted",
    )
    for p, s, c in TMA if use_tma else []:
        ways[f"tma_{p}_{s}_{c}"] = (tma(p, s, c), "")
    if use_tma:
        ways["tma_32_4_16_sorted"] = (tma(32, 4, 16, "sorted"), "sorted")
        ways["tma_32_4_16_seq"] = (tma(32, 4, 16, "seq"), "seq")
    for x in HYBRID:
        ways[f"hybrid_{x}"] = (hybrid(x), "")
    failed: dict[str, str] = {}
    with torch.cuda.stream(stream):
        for name, (fn, _) in list(ways.items()):  # warm-up (builds, first touches)
            try:
                fn()
                torch.cuda.synchronize()
            except RuntimeError as e:
                failed[name] = str(e)
                del ways[name]
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(reps):
            for name, (fn, _) in ways.items():
                times[name].append(timed(fn))
        wrong: list[str] = []
        for name, (fn, table) in ways.items():
            if name == "copy_rate":
                continue
            k_dst.fill_(float("nan"))
            v_dst.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            t = tables[table]
            if not (torch.equal(k_dst.cpu(), k_src[t]) and torch.equal(v_dst.cpu(), v_src[t])):
                wrong.append(name)
    out: dict[str, Any] = {"tokens": tokens, "block": block, "blocks": n, "bytes": nbytes,
                           "failed": failed, "wrong_bytes": wrong}  # fmt: skip
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"ms_median": med, "ms_min": min(ts), "ms_max": max(ts),
                     "GBps_median": nbytes / med / 1e6}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--blocks", type=int, nargs="+", default=[256], help="block sizes, tokens")
    ap.add_argument("--skip-tma", action="store_true", help="leave the TMA ways out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not cuda_ext.enabled(dev):
        print("needs a CUDA device and nvcc", file=sys.stderr)
        return 2
    gl, sw = libraries(dev)
    meta = {
        "card": torch.cuda.get_device_name(0),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "shape": f"bf16, {a.blocks}-token blocks, {HKV} KV heads, head {HEAD}, random table",
    }
    print(json.dumps(meta), flush=True)
    results = []
    for t in a.tokens:
        for block in a.blocks:
            r = run(t, block, a.reps, gl, sw, not a.skip_tma)
            results.append(r)
            rate = r["copy_rate"]["GBps_median"]
            print(
                f"## {t} tokens, block {block}, {r['bytes']} B K+V; failed {r['failed']}; "
                f"wrong {r['wrong_bytes']}"
            )
            for k, v in r.items():
                if isinstance(v, dict) and "ms_median" in v:
                    pct = 100 * v["GBps_median"] / rate
                    print(f"{k:16s} {v['ms_median']:8.3f} ms ({v['ms_min']:.3f}-"
                          f"{v['ms_max']:.3f}) {v['GBps_median']:6.1f} GB/s {pct:5.1f} %",
                          flush=True)  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "paged_staging_ways.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
