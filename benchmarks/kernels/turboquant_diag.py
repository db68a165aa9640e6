"""Diagnostics for the fused TurboQuant decode kernels: registers, spills, shared memory and
time of each compiled configuration (64K tokens, 32 q / 8 KV heads, d 128, 4-bit preset).

    PYTHONPATH=src python3 benchmarks/kernels/turboquant_diag.py
"""

from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench
from turboquant_decode import PRESET, D, bench_inputs, kernel_breakdown

from servelab.kernels.turboquant import (
    KVCodec,
    fused_generic_triton,
    fused_words_triton,
    unfused_decode_attention,
)
from servelab.kernels.turboquant.fused_decode import (
    DecodeConstants,
    LaunchConfig,
    fused_decode_attention,
    fused_decode_attention_dense,
)


def compiled(fn: object) -> list[dict[str, object]]:
    rows = []
    for cache in getattr(fn, "device_caches", {}).values():
        for kern in cache[0].values():
            md = kern.metadata
            rows.append({
                "name": md.name, "regs": kern.n_regs, "spills": kern.n_spills,
                "shared": md.shared, "warps": md.num_warps, "stages": md.num_stages,
            })  # fmt: skip
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    q, k, v = bench_inputs(tokens)
    codec = KVCodec.build(PRESET, D)
    cache = codec.encode(k, v)
    consts = DecodeConstants.build(codec, q.device)
    want = unfused_decode_attention(q, cache, codec)
    configs = [
        LaunchConfig(bn, w, st, sp)
        for bn, w, st, sp in (
            (32, 4, 1, 528), (32, 4, 2, 528), (32, 4, 2, 1056), (64, 4, 2, 264),
            (16, 4, 2, 1056), (32, 2, 2, 1056), (64, 8, 2, 528),
        )
    ]  # fmt: skip
    for cfg in configs:
        f = lambda c=cfg: fused_decode_attention(  # noqa: E731
            q, cache, codec, constants=consts, config=c, check_values=False
        )
        err = float((f().double() - want).abs().max())
        ms = do_bench(f, warmup=25, rep=60, return_mode="median")
        shape = [cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.num_splits]
        print(json.dumps({"tq_words": shape, "ms": round(ms, 4), "err": err}))
    old = LaunchConfig(128, 4, 2, None, precise_table=False, generic=True)
    ms = do_bench(
        lambda: fused_decode_attention(
            q, cache, codec, constants=consts, config=old, check_values=False
        ),
        return_mode="median",
    )
    print(json.dumps({"tq_generic": "128/4/2", "ms": round(ms, 4)}))
    for cfg in (LaunchConfig(64, 4, 3, 264), LaunchConfig(32, 4, 3, 528)):
        ms = do_bench(lambda c=cfg: fused_decode_attention_dense(q, k, v, config=c,
                                                                  check_values=False),
                      return_mode="median")  # fmt: skip
        print(json.dumps({"dense_words": [cfg.block_n, cfg.num_warps, cfg.num_stages,
                                          cfg.num_splits], "ms": round(ms, 4)}))  # fmt: skip
    best = LaunchConfig(64, 4, 2, 264)
    for fn in (
        lambda: fused_decode_attention(
            q, cache, codec, constants=consts, config=best, check_values=False
        ),
        lambda: fused_decode_attention_dense(q, k, v, config=best, check_values=False),
    ):
        for name, us in kernel_breakdown(fn).items():
            print(json.dumps({"kernel": name, "us_per_call": us}))
    for row in compiled(fused_words_triton.decode_split_words_kernel) + compiled(
        fused_generic_triton._decode_split_kernel
    ):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
