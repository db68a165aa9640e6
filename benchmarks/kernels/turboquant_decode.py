"""Decode attention over TurboQuant 4-bit K/V vs bf16 K/V (fused Triton kernel) vs torch SDPA.

One query token, batch 1, 32 query heads over 8 KV heads (GQA 4:1), head size 128, contexts
of 64K and 128K tokens. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed
before every run), with plain launches and with CUDA-graph replay. Also: encode throughput,
the device's copy bandwidth, and on-device correctness of every timed path.

    python benchmarks/kernels/turboquant_decode.py --out DIR [--tokens 65536 131072]

Writes DIR/turboquant_decode.json and prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from servelab.kernels import cuda_ext
from servelab.kernels.turboquant import (
    KVCodec,
    reference_decode_attention,
    unfused_decode_attention,
)
from servelab.kernels.turboquant.fused_decode import (
    DecodeConstants,
    LaunchConfig,
    fused_decode_attention,
    fused_decode_attention_dense,
)

HQ, HKV, D = 32, 8, 128
PRESET = "turboquant_4bit_nc"


def spin(seconds: float = 0.3) -> None:
    """Keep the GPU busy so its clocks are up before timing: on 2026-11-25 one config timed
    right after a compile pause ran up to 1.7x slower than the same config later in the run."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds (warm-up and repetitions are in ms for do_bench)."""
    fn()  # compile outside the warm-up window
    spin()
    return float(do_bench(fn, warmup=50, rep=100, return_mode="median"))


def graph_of(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph (three warm-up calls on a side stream first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_bench(fn: Callable[[], Any]) -> float:
    return bench(graph_of(fn).replay)


def card_meta() -> dict[str, Any]:
    """The labels every GPU benchmark file carries: card, SMs, date, torch, CUDA, command."""
    props = torch.cuda.get_device_properties(0)
    return {
        "card": props.name,
        "sm_count": props.multi_processor_count,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "command": " ".join(sys.argv),
    }


def needs_cuda_kernel() -> bool:
    """True where the CUDA kernel can run; says why not on stderr otherwise."""
    if torch.cuda.is_available() and cuda_ext.enabled(torch.device("cuda")):
        return True
    print("needs a CUDA device and nvcc", file=sys.stderr)
    return False


def kernel_breakdown(fn: Callable[[], Any], calls: int = 20) -> dict[str, float]:
    """Mean device microseconds per call of every kernel ``fn`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        us = float(getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0))
        if us > 0:
            out[ev.key[:60]] = round(us / calls, 2)
    return out


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, bytes read plus written (the practical ceiling)."""
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e6


def sdpa_variants(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, float] = {}
    out["sdpa_default"] = bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    for name, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                out[name] = bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
        except RuntimeError as exc:  # backend refuses this shape or GQA
            print(f"  {name}: not available ({str(exc).splitlines()[0][:100]})")
    return out


def sweep(
    fn: Callable[[LaunchConfig], Any], configs: list[LaunchConfig], split_options: tuple[int, ...]
) -> tuple[LaunchConfig, float, list[dict]]:
    """Time each config, then the best one at other split counts; return the fastest."""
    rows: list[dict] = []
    best: tuple[LaunchConfig, float] | None = None

    def one(cfg: LaunchConfig) -> None:
        nonlocal best
        try:
            ms = bench(lambda: fn(cfg))
        except Exception as exc:  # e.g. a tile too large for shared memory: skip the config
            print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
            return
        rows.append({"config": dataclasses.asdict(cfg), "ms": ms})
        if best is None or ms < best[1]:
            best = (cfg, ms)

    for cfg in configs:
        one(cfg)
    if best is None:
        raise RuntimeError("no configuration ran")
    for splits in split_options:
        one(dataclasses.replace(best[0], num_splits=splits))
    return best[0], best[1], rows


def bench_inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 q [1, HQ, D] and K, V [1, HKV, tokens, D] (never zeros), seeded by tokens."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    q = torch.randn(1, HQ, D, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(1, HKV, tokens, D, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(1, HKV, tokens, D, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v


def run(tokens: int, hbm: float, sm: int) -> dict[str, Any]:
    q, k, v = bench_inputs(tokens)
    codec = KVCodec.build(PRESET, D)
    res: dict[str, Any] = {"tokens": tokens}

    enc_ms = bench(lambda: codec.encode(k, v))
    in_bytes = 2 * k.numel() * k.element_size()
    res["encode_ms"] = enc_ms
    res["encode_GBps_in"] = in_bytes / enc_ms / 1e6
    cache = codec.encode(k, v)
    consts = DecodeConstants.build(codec, q.device)
    res["bytes_bf16"] = in_bytes
    res["bytes_tq"] = cache.nbytes()

    # Correctness on the device, on the very inputs that are timed.
    fused = fused_decode_attention(q, cache, codec, constants=consts).double()
    unfused = unfused_decode_attention(q, cache, codec)
    exact = reference_decode_attention(q, k, v)
    dense = fused_decode_attention_dense(q, k, v).double()
    q4 = q.unsqueeze(2)
    sdpa = F.scaled_dot_product_attention(q4, k, v, enable_gqa=True).squeeze(2).double()
    res["err_fused_vs_unfused_maxabs"] = float((fused - unfused).abs().max())
    res["err_dense_vs_f64_maxabs"] = float((dense - exact).abs().max())
    res["err_sdpa_vs_f64_maxabs"] = float((sdpa - exact).abs().max())
    res["cos_tq_vs_f64_min"] = float(F.cosine_similarity(fused, exact, dim=-1).min())

    res["sdpa"] = sdpa_variants(q4, k, v)
    res["sdpa_best_ms"] = min(res["sdpa"].values())

    # Dense: the word kernel reading bf16 K/V (the same kernel as the TQ4 rows) over a few
    # tile shapes; the older generic kernel's best config beside it for the history.
    dense_cfgs = [LaunchConfig(64, 4, 2), LaunchConfig(64, 4, 3), LaunchConfig(32, 4, 3)]
    dense_fn = lambda c: fused_decode_attention_dense(q, k, v, config=c, check_values=False)  # noqa: E731
    word_splits = math.ceil(8 * sm / HKV)
    cfg_d, ms_d, rows_d = sweep(dense_fn, dense_cfgs, (word_splits // 2, word_splits * 2))
    res["dense_generic_ms"] = bench(lambda: dense_fn(LaunchConfig(128, 8, 2, generic=True)))
    tq_cfgs = [
        LaunchConfig(bn, w, st) for bn, w, st in ((32, 4, 2), (64, 4, 2), (128, 4, 2), (64, 8, 2))
    ]
    tq = lambda c: fused_decode_attention(  # noqa: E731
        q, cache, codec, constants=consts, config=c, check_values=False
    )
    cfg_t, ms_t, rows_t = sweep(tq, tq_cfgs, (word_splits // 2, word_splits * 2))
    # The timed configurations are the precise ones (q and p·scale as two fp16 terms, the
    # table's fp16 residue added); what the precision costs, measured beside them:
    fast = dataclasses.replace(cfg_t, precise_table=False)
    res["tq_fast_ms"] = bench(lambda: tq(fast))
    res["err_tq_fast_vs_unfused_maxabs"] = float((tq(fast).double() - unfused).abs().max())
    bare = dataclasses.replace(fast, split_operands=False)
    res["tq_bare_ms"] = bench(lambda: tq(bare))
    # The generic kernel (every preset) on the same cache, at its precise default.
    res["tq_generic_ms"] = bench(lambda: tq(LaunchConfig(128, 4, 2, generic=True)))
    res.update(
        dense_best=dataclasses.asdict(cfg_d),
        dense_ms=ms_d,
        dense_sweep=rows_d,
        tq_best=dataclasses.asdict(cfg_t),
        tq_ms=ms_t,
        tq_sweep=rows_t,
    )
    res["tq_graph_ms"] = graph_bench(lambda: tq(cfg_t))
    res["dense_graph_ms"] = graph_bench(
        lambda: fused_decode_attention_dense(q, k, v, config=cfg_d, check_values=False)
    )
    res["sdpa_graph_ms"] = graph_bench(
        lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    )
    # Correctness of the timed fast configuration itself, on these inputs.
    res["err_tq_best_vs_unfused_maxabs"] = float((tq(cfg_t).double() - unfused).abs().max())
    del unfused, exact
    for key, nbytes in (("tq", res["bytes_tq"]), ("dense", in_bytes)):
        for mode in ("ms", "graph_ms"):
            gbps = nbytes / res[f"{key}_{mode}"] / 1e6
            res[f"{key}_{mode}_GBps"] = gbps
            res[f"{key}_{mode}_frac_copy_bw"] = gbps / hbm
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[65536, 131072])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    meta = {
        "card": props.name,
        "sm_count": props.multi_processor_count,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "shape": f"batch 1, 1 query token, {HQ} q heads / {HKV} KV heads, d={D}",
        "preset": PRESET,
    }
    hbm = copy_bandwidth()
    meta["copy_bw_GBps"] = hbm
    print(json.dumps(meta))
    results = []
    for t in args.tokens:
        r = run(t, hbm, props.multi_processor_count)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("sweep")}))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "turboquant_decode.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "turboquant_decode.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1)
    )
    print(
        f"\n{meta['card']}, {meta['date_utc']}, torch {meta['torch']}, triton "
        f"{meta['triton']}; copy bandwidth {hbm:.0f} GB/s (read+write)"
    )
    print(
        "| tokens | SDPA bf16 best (ms) | fused bf16 (ms) | fused TQ4 (ms) | TQ4 vs SDPA | "
        "TQ4 vs fused bf16 | bytes ratio | TQ4 GB/s | graph: SDPA / bf16 / TQ4 (ms) | "
        "encode GB/s | generic kernel TQ4 / bf16 (ms) | TQ4 fast / bare (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['tokens']} | {r['sdpa_best_ms']:.4f} | {r['dense_ms']:.4f} | "
            f"{r['tq_ms']:.4f} | {r['sdpa_best_ms'] / r['tq_ms']:.2f}x | "
            f"{r['dense_ms'] / r['tq_ms']:.2f}x | {r['bytes_bf16'] / r['bytes_tq']:.2f}x | "
            f"{r['tq_ms_GBps']:.0f} | {r['sdpa_graph_ms']:.4f} / {r['dense_graph_ms']:.4f} / "
            f"{r['tq_graph_ms']:.4f} | {r['encode_GBps_in']:.1f} | "
            f"{r['tq_generic_ms']:.4f} / {r['dense_generic_ms']:.4f} | "
            f"{r['tq_fast_ms']:.4f} / {r['tq_bare_ms']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
