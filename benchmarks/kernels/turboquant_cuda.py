"""The CUDA TurboQuant decode kernel (csrc/tq4_decode.cu) against torch SDPA over bf16 and the
Triton word kernel over bf16 and over the same 4-bit cache, side by side in one run.

One query token, batch 1, 32 query heads over 8 KV heads, head size 128, ``turboquant_4bit_nc``;
every time is the median of triton.testing.do_bench over CUDA-graph replays of the whole call
(query rotation, split kernel, merge), L2 flushed before each. The CUDA kernel is swept over
warps per CTA and split counts; its errors against the dequantized cache are measured on the
timed inputs. Also, for the best CUDA configuration, SDPA and the Triton bf16 kernel: the
device time of their kernels alone (torch.profiler), and the per-call time inside one graph
of 8 calls over 8 layers' own K/V (one launch for all, as a model's decode step).

    python benchmarks/kernels/turboquant_cuda.py --out DIR [--tokens 65536 131072]

Writes DIR/turboquant_cuda.json and prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tq4_layers import LAYERS, layer_times
from turboquant_decode import (
    HKV,
    HQ,
    PRESET,
    D,
    bench_inputs,
    card_meta,
    copy_bandwidth,
    graph_bench,
    kernel_breakdown,
    needs_cuda_kernel,
)

from servelab.kernels.turboquant import KVCodec, unfused_decode_attention
from servelab.kernels.turboquant.fused_decode import (
    DecodeConstants,
    LaunchConfig,
    fused_decode_attention,
    fused_decode_attention_dense,
)
from servelab.kernels.turboquant.fused_words_cuda import default_splits, library


def run(tokens: int, sm_splits: dict[int, int]) -> dict[str, Any]:
    q, k, v = bench_inputs(tokens)
    codec = KVCodec.build(PRESET, D)
    cache = codec.encode(k, v)
    consts = DecodeConstants.build(codec, q.device)
    res: dict[str, Any] = {"tokens": tokens, "bytes_bf16": 2 * k.numel() * 2}
    res["bytes_tq"] = cache.nbytes()
    unfused = unfused_decode_attention(q, cache, codec)

    def tq(cfg: LaunchConfig) -> torch.Tensor:
        return fused_decode_attention(q, cache, codec, constants=consts, config=cfg,
                                      check_values=False)  # fmt: skip

    q4 = q.unsqueeze(2)
    res["sdpa_graph_ms"] = graph_bench(
        lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    )
    triton_cfg = LaunchConfig(64, 4, 2, backend="triton")
    res["triton_bf16_graph_ms"] = graph_bench(
        lambda: fused_decode_attention_dense(q, k, v, config=triton_cfg, check_values=False)
    )
    res["triton_tq4_graph_ms"] = graph_bench(lambda: tq(triton_cfg))
    rows = []
    for warps in (8, 16):
        base = sm_splits[warps]
        for splits in (base, 2 * base):
            for precise in (True, False):
                cfg = LaunchConfig(backend="cuda", cuda_warps=warps, num_splits=splits,
                                   precise_table=precise)  # fmt: skip
                err = float((tq(cfg).double() - unfused).abs().max())
                ms = graph_bench(lambda c=cfg: tq(c))
                rows.append({"warps": warps, "splits": splits, "precise": precise, "ms": ms,
                             "err_vs_unfused_maxabs": err})  # fmt: skip
                print(json.dumps({"tokens": tokens, **rows[-1]}), flush=True)
    res["cuda_sweep"] = rows
    best_p = min((r for r in rows if r["precise"]), key=lambda r: r["ms"])
    best_f = min((r for r in rows if not r["precise"]), key=lambda r: r["ms"])
    res["cuda_precise_best"] = best_p
    res["cuda_fast_best"] = best_f
    best_cfg = LaunchConfig(backend="cuda", cuda_warps=best_p["warps"], num_splits=best_p["splits"])
    # Device time of the kernels alone (no launch): every kernel of one call, summed.
    res["cuda_precise_kernels_us"] = kernel_breakdown(lambda: tq(best_cfg))
    res["sdpa_kernels_us"] = kernel_breakdown(
        lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    )
    res["triton_bf16_kernels_us"] = kernel_breakdown(
        lambda: fused_decode_attention_dense(q, k, v, config=triton_cfg, check_values=False)
    )
    for key in ("cuda_precise", "sdpa", "triton_bf16"):
        res[f"{key}_kernel_ms"] = sum(res[f"{key}_kernels_us"].values()) / 1e3
    print(json.dumps({"tokens": tokens, **{k: v for k, v in res.items() if "kernel" in k}}),
          flush=True)  # fmt: skip
    res.update(layers(tokens, best_cfg))
    return res


def layers(tokens: int, cfg: LaunchConfig) -> dict[str, float]:
    """Per-call milliseconds inside one CUDA graph of LAYERS calls over LAYERS layers' own K/V
    (as a model's decode step runs its layers), SDPA and the CUDA kernel (tq4_layers.py)."""
    us = layer_times(tokens, {"cuda": cfg}, sdpa=True)
    out = {"sdpa_layers_graph_ms": us["sdpa_us"] / 1e3,
           "cuda_precise_layers_graph_ms": us["cuda"] / 1e3}  # fmt: skip
    print(json.dumps({"tokens": tokens, "layers": LAYERS, **out}), flush=True)
    return out


def once(tokens: int) -> None:
    """Three calls of the default configuration (for an external profiler)."""
    q, k, v = bench_inputs(tokens)
    codec = KVCodec.build(PRESET, D)
    cache = codec.encode(k, v)
    for _ in range(3):
        fused_decode_attention(q, cache, codec, config=LaunchConfig(backend="cuda"))
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--once", action="store_true", help="three calls at the first size, no timing")
    args = ap.parse_args()
    if not needs_cuda_kernel():
        return 2
    if args.once:
        once(args.tokens[0])
        return 0
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    library(dev)
    build_s = time.perf_counter() - t0
    meta = {
        **card_meta(),
        "shape": f"batch 1, 1 query token, {HQ} q heads / {HKV} KV heads, d={D}",
        "preset": PRESET,
        "build_or_load_s": build_s,
        "timing": "median of do_bench over CUDA-graph replays of the whole call",
    }
    meta["copy_bw_GBps"] = copy_bandwidth()
    print(json.dumps(meta), flush=True)
    sm_splits = {w: default_splits(dev, w, 1, HKV) for w in (8, 16)}
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for t in args.tokens:
        results.append(run(t, sm_splits))
        (args.out / "turboquant_cuda.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1)
        )
    print(f"\n{meta['card']}, {meta['date_utc']}, torch {meta['torch']}")
    print(
        "| tokens | SDPA bf16 | Triton bf16 | Triton TQ4 | CUDA TQ4 precise (warps/splits) | "
        "CUDA TQ4 fast | precise vs SDPA | precise vs Triton bf16 | fast vs SDPA | "
        "err precise / fast | CUDA TQ4 GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        p, f = r["cuda_precise_best"], r["cuda_fast_best"]
        print(
            f"| {r['tokens']} | {r['sdpa_graph_ms']:.4f} | {r['triton_bf16_graph_ms']:.4f} | "
            f"{r['triton_tq4_graph_ms']:.4f} | {p['ms']:.4f} ({p['warps']}/{p['splits']}) | "
            f"{f['ms']:.4f} ({f['warps']}/{f['splits']}) | {r['sdpa_graph_ms'] / p['ms']:.2f}x | "
            f"{r['triton_bf16_graph_ms'] / p['ms']:.2f}x | {r['sdpa_graph_ms'] / f['ms']:.2f}x | "
            f"{p['err_vs_unfused_maxabs']:.1e} / {f['err_vs_unfused_maxabs']:.1e} | "
            f"{r['bytes_tq'] / p['ms'] / 1e6:.0f} |"
        )
        rows.append(
            f"| {r['tokens']} | {r['sdpa_kernel_ms']:.4f} | {r['triton_bf16_kernel_ms']:.4f} | "
            f"{r['cuda_precise_kernel_ms']:.4f} | "
            f"{r['sdpa_kernel_ms'] / r['cuda_precise_kernel_ms']:.2f}x | "
            f"{r['sdpa_layers_graph_ms']:.4f} | {r['cuda_precise_layers_graph_ms']:.4f} | "
            f"{r['sdpa_layers_graph_ms'] / r['cuda_precise_layers_graph_ms']:.2f}x |"
        )
    print(
        f"\n| tokens | SDPA kernels (ms) | Triton bf16 kernels | CUDA TQ4 precise kernel | "
        f"kernel ratio | SDPA, {LAYERS}-layer graph (ms/call) | CUDA TQ4, {LAYERS}-layer graph | "
        "graph ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
