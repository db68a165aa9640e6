"""Per-CTA timeline of one launch of the CUDA TurboQuant kernel: where its time goes.

A copy of csrc/tq4_decode.cu is built with %globaltimer stamps written by thread 0 of every
CTA (a timing-only build under another cache key; the package's kernel is untouched): entry,
the small loads landed, the rotation done, the prologue done (query fragments built), warp
0's tile loop done, every warp's loop done (the fold's barrier), the partials published, exit
(after the merge in the last CTA of each KV head). The call is the default configuration at
one context length, after an L2 flush (``--warm``: without), and the fifth of five calls.
Prints, per stamp, the min / median / max over CTAs in µs from the first CTA's entry.

    python benchmarks/kernels/tq4_timeline.py [--tokens 65536] [--warm]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from turboquant_decode import PRESET, D, bench_inputs

from servelab.kernels import cuda_ext
from servelab.kernels.turboquant import KVCodec, fused_words_cuda
from servelab.kernels.turboquant.fused_decode import (
    DecodeConstants,
    LaunchConfig,
    fused_decode_attention,
)

SLOTS = 16  # stamps a CTA
STAMPS = {  # slot: (name, anchor line in tq4_decode.cu the stamp goes after)
    0: ("entry", "  grid_dependency_wait();\n"),
    1: ("small loads landed", '  asm volatile("" ::: "memory");  // and the query rows\' stores'),
    2: ("rotation done", "    qparts[(rk * GP + r) * D + rc] = acc0;\n  }\n"),
    3: ("prologue done", "  const uint8_t* qf = smem + SM::QF + lane * 8;\n"),
    4: ("warp 0 loop done", "  launch_dependents();\n"),
    5: ("all loops done", "  float* so = reinterpret_cast<float*>(smem);"),
    6: ("published", "    is_last = done == a.num_splits - 1;\n  }\n  __syncthreads();\n"),
    7: (
        "exit",
        "  if (threadIdx.x == 0) a.counters[b * hkv + kvh] = 0;  // ready for the next call\n",
    ),
}
CTA = "((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x)"


def stamp(slot: int) -> str:
    return f"  if (threadIdx.x == 0) g_tl[{CTA} * {SLOTS} + {slot}] = gtime();\n"


def patched_source(src: Path, out_dir: Path) -> Path:
    """The kernel source with the stamps in; every anchor must be found exactly where meant."""
    s = src.read_text()
    head = (
        "namespace {\n"
        f"__device__ unsigned long long g_tl[4096 * {SLOTS}];\n"
        "__device__ __forceinline__ unsigned long long gtime() {\n"
        '  unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t;\n'
        "}\n"
    )
    s = s.replace("namespace {\n", head, 1)
    for slot, (name, anchor) in STAMPS.items():
        if s.count(anchor) < 1:
            raise SystemExit(f"tq4_timeline: the anchor of stamp {name!r} is gone from {src}")
        where = s.index(anchor) + len(anchor)
        if slot in (1, 7):  # after the end of that line
            where = s.index("\n", where - 1 if s[where - 1] == "\n" else where) + 1
        if slot == 5:  # before the anchor
            where = s.index(anchor)
        s = s[:where] + stamp(slot) + s[where:]
    # The non-last CTAs leave at "if (!is_last) return;": stamp their exit there too.
    s = s.replace(
        "  if (!is_last) return;", "  if (!is_last) {\n" + stamp(7) + "    return;\n  }", 1
    )
    s = s.replace(
        "const char* servelab_cuda_error(int e)",
        "int tq4_timeline(void* dst) {\n"
        "  return (int)cudaMemcpyFromSymbol(dst, g_tl, sizeof(g_tl));\n}\n\n"
        "const char* servelab_cuda_error(int e)",
        1,
    )
    out = out_dir / "tq4_decode.cu"
    out.write_text(s)
    shutil.copy(src.with_name("tq4_tiles.cuh"), out_dir / "tq4_tiles.cuh")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--warm", action="store_true", help="no L2 flush before the calls")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not cuda_ext.enabled(torch.device("cuda")):
        print("needs a CUDA device and nvcc", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tq4_timeline_"))
    src = patched_source(cuda_ext.source("tq4_decode.cu"), tmp)
    real_source = cuda_ext.source
    cuda_ext.source = lambda name: src if name == "tq4_decode.cu" else real_source(name)  # type: ignore[assignment]
    codec = KVCodec.build(PRESET, D)
    q, k, v = bench_inputs(args.tokens)
    cache = codec.encode(k, v)
    consts = DecodeConstants.build(codec, q.device)
    lib = fused_words_cuda.library(q.device)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(5):
        if not args.warm:
            flush.zero_()
        fused_decode_attention(q, cache, codec, constants=consts,
                               config=LaunchConfig(backend="cuda"), check_values=False)  # fmt: skip
    torch.cuda.synchronize()
    buf = (ctypes.c_ulonglong * (4096 * SLOTS))()
    cuda_ext.check(lib, lib.tq4_timeline(ctypes.byref(buf)), "tq4_timeline")
    ctas = 8 * fused_words_cuda.default_splits(q.device, 16, 1, 8)
    a = np.frombuffer(buf, dtype=np.uint64).reshape(4096, SLOTS)[:ctas].astype(np.int64)
    rel = (a[:, : len(STAMPS)] - a[:, 0].min()) / 1000.0
    print(
        f"{torch.cuda.get_device_name(0)}, {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}"
        f", {args.tokens} tokens, {ctas} CTAs, {'warm' if args.warm else 'L2 flushed'}, "
        f"command: {' '.join(sys.argv)}"
    )
    print("| stamp | min µs | median µs | max µs |\n|---|---|---|---|")
    for slot, (name, _) in STAMPS.items():
        col = rel[:, slot]
        print(f"| {name} | {col.min():.2f} | {np.median(col):.2f} | {col.max():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
