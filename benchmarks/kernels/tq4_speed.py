"""TurboQuant 4-bit decode against every bf16 path, side by side, in one run on one card.

Paths (one query token, 8 KV heads, head size 128, ``turboquant_4bit_nc``): torch SDPA over
bf16 with the cuDNN backend and with the flash backend (``enable_gqa=True``), the Triton
word kernel over bf16, the CUDA kernel over the 4-bit cache (``csrc/tq4_decode.cu``) and the
Triton word kernel over the same cache. Timings, each a median:

- cold: one call replayed from a CUDA graph, L2 flushed before each replay (do_bench);
- warm: the same replays without the flush (CUDA events around each, 100 replays);
- graph: per call inside one CUDA graph of 8 calls over 8 layers' own K/V, L2 flushed
  before each replay (a model's decode step);
- eager: 50 calls of the public API back to back, no graph, CUDA events around the batch,
  divided by 50, median of 3 batches (what a decode loop outside a graph sees, host cost
  included).

Also: the card's read rate (``torch.sum`` over 2 GiB of bf16, cold) and copy rate (read +
write), the CUDA kernel's bytes per second at each size, the host time of one eager call of
each path (the GPU kept busy by ``torch.cuda._sleep`` so the host's enqueue time is what is
timed), GQA ratios 1, 4 and 8 at batch 1 and 8, and the CUDA kernel's configurations (table
precision, table rows 128 or 256 bytes apart, warps a CTA; cold, in rounds that take each in
turn). Errors of both TQ4 paths against the dequantized cache are
measured on the timed inputs.

    python benchmarks/kernels/tq4_speed.py --out DIR [--tokens 16384 ... 262144] [--quick]
    python benchmarks/kernels/tq4_speed.py --out DIR --configs-only   # the configurations alone

Writes DIR/tq4_speed.json as it goes and prints Markdown tables last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench
from turboquant_decode import card_meta, graph_of, needs_cuda_kernel, spin

from servelab.kernels.turboquant import KVCodec, unfused_decode_attention
from servelab.kernels.turboquant.fused_decode import (
    DecodeConstants,
    LaunchConfig,
    fused_decode_attention,
    fused_decode_attention_dense,
)

HKV, D, LAYERS, EAGER_CALLS = 8, 128, 8, 50
PRESET = "turboquant_4bit_nc"
PATHS = ("sdpa_cudnn", "sdpa_flash", "triton_bf16", "tq4_cuda", "tq4_triton")
TRITON = LaunchConfig(64, 4, 2, backend="triton")
CUDA = LaunchConfig(backend="cuda")
Fn = Callable[[], Any]


def cold_ms(fn: Fn) -> float:
    return float(do_bench(fn, warmup=20, rep=50, return_mode="median"))


def warm_ms(fn: Fn, reps: int = 100) -> float:
    for _ in range(10):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(starts, ends, strict=True):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))


def eager_ms(fn: Fn, calls: int = EAGER_CALLS) -> float:
    """Per call over ``calls`` back-to-back calls, median of 3 batches."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def host_us(fn: Fn, calls: int = 200) -> float:
    """Host time of one call: the GPU held busy (torch.cuda._sleep) so that enqueueing never
    waits on it; median of 5 batches."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time at ~2 GHz
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


@dataclass(frozen=True)
class Case:
    """Random bf16 q [B, Hq, d] and K, V [B, HKV, T, d], their 4-bit cache and the codec's
    constants: what every path of one measurement reads."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    codec: KVCodec
    cache: Any
    consts: DecodeConstants

    @classmethod
    def make(cls, batch: int, hq: int, tokens: int, seed: int) -> Case:
        g = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randn(batch, hq, D, device="cuda", generator=g).to(torch.bfloat16)
        k = torch.randn(batch, HKV, tokens, D, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(batch, HKV, tokens, D, device="cuda", generator=g).to(torch.bfloat16)
        codec = KVCodec.build(PRESET, D)
        return cls(q, k, v, codec, codec.encode(k, v), DecodeConstants.build(codec, q.device))

    def fns(self, check: bool = False, cfg: LaunchConfig = CUDA) -> dict[str, Fn]:
        return path_fns(self.q, self.k, self.v, self.cache, self.codec, self.consts, check, cfg)


def path_fns(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any, codec: KVCodec,
    consts: DecodeConstants, check: bool = False, cfg: LaunchConfig = CUDA,
) -> dict[str, Fn]:  # fmt: skip
    """One call of each path over these inputs (public APIs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4 = q.unsqueeze(2)

    def sdpa(backend: SDPBackend) -> Fn:
        def fn() -> Any:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

        return fn

    return {
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "triton_bf16": lambda: fused_decode_attention_dense(
            q, k, v, config=TRITON, check_values=check
        ),
        "tq4_cuda": lambda: fused_decode_attention(
            q, cache, codec, constants=consts, config=cfg, check_values=check
        ),
        "tq4_triton": lambda: fused_decode_attention(
            q, cache, codec, constants=consts, config=TRITON, check_values=check
        ),
    }


def guarded(name: str, fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception as exc:  # a backend that refuses a shape: reported, not fatal
        print(f"  {name}: not available ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})")
        return None


def layer_graph_ms(batch: int, hq: int, tokens: int) -> dict[str, float | None]:
    """Per-call ms inside one graph of LAYERS calls over LAYERS layers' own K/V, each path."""
    fns = [Case.make(batch, hq, tokens, 1000 + i).fns() for i in range(LAYERS)]
    res: dict[str, float | None] = {}
    for name in PATHS:

        def all_layers(name: str = name) -> None:
            for f in fns:
                f[name]()

        res[name] = guarded(name, lambda f=all_layers: cold_ms(graph_of(f).replay) / LAYERS)
    return res


def one_size(batch: int, tokens: int, hq: int) -> dict[str, Any]:
    c = Case.make(batch, hq, tokens, tokens + batch)
    res: dict[str, Any] = {"batch": batch, "tokens": tokens, "q_heads": hq, "kv_heads": HKV}
    res["bytes_bf16"] = 2 * c.k.numel() * c.k.element_size()
    res["bytes_tq4"] = c.cache.nbytes()
    fns = c.fns()
    if batch * tokens <= 262144:  # the float64 reference holds the whole cache dequantized
        want = unfused_decode_attention(c.q, c.cache, c.codec)
        for name in ("tq4_cuda", "tq4_triton"):
            res[f"{name}_err_maxabs"] = float((fns[name]().double() - want).abs().max())
        del want
    spin()
    for name, fn in fns.items():
        res[f"{name}_cold_ms"] = guarded(name, lambda fn=fn: cold_ms(graph_of(fn).replay))
        res[f"{name}_warm_ms"] = guarded(name, lambda fn=fn: warm_ms(graph_of(fn).replay))
        res[f"{name}_eager_ms"] = guarded(name, lambda fn=fn: eager_ms(fn))
    checked = c.fns(check=True)["tq4_cuda"]
    res["tq4_cuda_eager_checked_ms"] = guarded("checked", lambda: eager_ms(checked))
    return res


def sized(batch: int, tokens: int, hq: int, graph: bool) -> dict[str, Any]:
    """One size: every path single-call (one_size), then the 8-layer graph (its inputs are
    made once the single-call ones are freed)."""
    res = one_size(batch, tokens, hq)
    torch.cuda.empty_cache()
    if graph:
        for name, ms in layer_graph_ms(batch, hq, tokens).items():
            res[f"{name}_graph_ms"] = ms
        torch.cuda.empty_cache()
    print(json.dumps(res), flush=True)
    return res


def gqa_row(batch: int, hq: int, tokens: int) -> dict[str, Any]:
    """SDPA (both backends) and the CUDA kernel, cold single call, at one GQA ratio."""
    fns = Case.make(batch, hq, tokens, hq + tokens).fns()
    r: dict[str, Any] = {"batch": batch, "tokens": tokens, "q_heads": hq, "kv_heads": HKV}
    for name in ("sdpa_cudnn", "sdpa_flash", "tq4_cuda"):
        r[f"{name}_cold_ms"] = guarded(name, lambda f=fns[name]: cold_ms(graph_of(f).replay))
    print(json.dumps(r), flush=True)
    return r


def host_costs() -> dict[str, float | None]:
    """Host µs of one eager call of each path, 64K tokens, batch 1, 32/8 heads."""
    c = Case.make(1, 32, 65536, 7)
    res: dict[str, float | None] = {}
    for check in (False, True):
        for name, fn in c.fns(check=check).items():
            if check and name.startswith("sdpa"):
                continue
            res[f"{name}{'_checked' if check else ''}_host_us"] = guarded(
                name, lambda fn=fn: host_us(fn)
            )
    print(json.dumps(res), flush=True)
    return res


#: The CUDA kernel's configurations: (warps a CTA, wide table), each with and without the
#: table's fp16 residue (precise).
CONFIGS = ((16, False), (16, True), (8, False))


def configs(tokens: int, rounds: int = 3) -> list[dict[str, Any]]:
    """The CUDA kernel's configurations at batch 1, 32/8 heads, cold single call: each
    configuration's median over `rounds` rounds that take every configuration in turn, so
    that configurations are compared side by side, not minutes apart."""
    c = Case.make(1, 32, tokens, 11)
    want = unfused_decode_attention(c.q, c.cache, c.codec)
    rows, graphs = [], []
    spin()
    for warps, wide in CONFIGS:
        for precise in (True, False):
            cfg = LaunchConfig(backend="cuda", cuda_warps=warps, precise_table=precise,
                               cuda_wide_table=wide)  # fmt: skip
            fn = c.fns(cfg=cfg)["tq4_cuda"]
            err = float((fn().double() - want).abs().max())
            rows.append({"tokens": tokens, "warps": warps, "wide": wide, "precise": precise,
                         "err_maxabs": err, "cold_ms_rounds": []})  # fmt: skip
            graphs.append(graph_of(fn))
    for _ in range(rounds):
        for row, graph in zip(rows, graphs, strict=True):
            row["cold_ms_rounds"].append(cold_ms(graph.replay))
    for row in rows:
        row["cold_ms"] = statistics.median(row["cold_ms_rounds"])
        row["GBps"] = c.cache.nbytes() / row["cold_ms"] / 1e6
        print(json.dumps(row), flush=True)
    return rows


def card_rates() -> dict[str, float]:
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    spin()
    read = cold_ms(lambda: x.sum(dtype=torch.float32))
    copy = cold_ms(lambda: y.copy_(x))
    nbytes = x.numel() * x.element_size()
    return {"read_GBps": nbytes / read / 1e6, "copy_GBps": 2 * nbytes / copy / 1e6}


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def report(meta: dict[str, Any], sizes: list[dict[str, Any]], gqa: list[dict[str, Any]],
           host: dict[str, Any], cfgs: list[dict[str, Any]]) -> None:  # fmt: skip
    print(f"\n{meta['card']}, {meta['date_utc']}, torch {meta['torch']}, read "
          f"{meta['read_GBps']:.0f} GB/s, copy {meta['copy_GBps']:.0f} "
          "GB/s (read + write)")  # fmt: skip
    print(f"command: {meta['command']}\n")
    head = "| batch | tokens | timing | " + " | ".join(PATHS) + " | TQ4 CUDA vs best SDPA |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in sizes:
        for mode in ("cold", "warm", "graph", "eager"):
            cells = [r.get(f"{p}_{mode}_ms") for p in PATHS]
            if all(c is None for c in cells):
                continue
            sd = [c for c in cells[:2] if c is not None]
            tq = r.get(f"tq4_cuda_{mode}_ms")
            ratio = f"{min(sd) / tq:.2f}×" if sd and tq else "n/a"
            print(f"| {r['batch']} | {r['tokens']} | {mode} | "
                  + " | ".join(fmt(c) for c in cells) + f" | {ratio} |")  # fmt: skip
    print("\n| batch | tokens | TQ4 CUDA GB/s cold / graph | % of read rate (graph) | "
          "eager checked ms | err CUDA / Triton |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in sizes:
        c, g = r.get("tq4_cuda_cold_ms"), r.get("tq4_cuda_graph_ms")
        bw = [r["bytes_tq4"] / x / 1e6 if x else None for x in (c, g)]
        pct = f"{100 * bw[1] / meta['read_GBps']:.0f} %" if bw[1] else "n/a"
        print(f"| {r['batch']} | {r['tokens']} | {fmt(bw[0], '.0f')} / {fmt(bw[1], '.0f')} | "
              f"{pct} | {fmt(r.get('tq4_cuda_eager_checked_ms'))} | "
              f"{fmt(r.get('tq4_cuda_err_maxabs'), '.1e')} / "
              f"{fmt(r.get('tq4_triton_err_maxabs'), '.1e')} |")  # fmt: skip
    print("\n| batch | q / KV heads | tokens | SDPA cuDNN cold | SDPA flash cold | TQ4 CUDA cold | "
          "ratio |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in gqa:
        sd = [x for x in (r.get("sdpa_cudnn_cold_ms"), r.get("sdpa_flash_cold_ms")) if x]
        tq = r.get("tq4_cuda_cold_ms")
        ratio = f"{min(sd) / tq:.2f}×" if sd and tq else "n/a"
        print(f"| {r['batch']} | {r['q_heads']} / {r['kv_heads']} | {r['tokens']} | "
              f"{fmt(r.get('sdpa_cudnn_cold_ms'))} | {fmt(r.get('sdpa_flash_cold_ms'))} | "
              f"{fmt(tq)} | {ratio} |")  # fmt: skip
    print("\n| host µs per eager call | " + " | ".join(host) + " |")
    print("|---" * (len(host) + 1) + "|")
    print("| 64K, batch 1 | " + " | ".join(fmt(v, ".1f") for v in host.values()) + " |")
    print("\n| tokens | warps | wide table | precise | cold ms (rounds) | GB/s | err |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip
    for c in cfgs:
        rounds = ", ".join(f"{x:.4f}" for x in c["cold_ms_rounds"])
        print(f"| {c['tokens']} | {c['warps']} | {c['wide']} | {c['precise']} | "
              f"{c['cold_ms']:.4f} ({rounds}) | {c['GBps']:.0f} | "
              f"{c['err_maxabs']:.1e} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[16384, 32768, 65536, 131072, 262144])  # fmt: skip
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--graph-max", type=int, default=131072,
                    help="the 8-layer graph up to this many tokens at batch > 1")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="64K and 128K, batch 1, no sweeps")
    ap.add_argument("--configs-only", action="store_true",
                    help="only the CUDA kernel's configurations, at 64K and 128K")  # fmt: skip
    args = ap.parse_args()
    if not needs_cuda_kernel():
        return 2
    if args.quick:
        args.tokens, args.batches = [65536, 131072], [1]
    meta: dict[str, Any] = {
        **card_meta(),
        "shape": f"1 query token, {HKV} KV heads, d={D}, {PRESET}, bf16 q/K/V",
        **card_rates(),
    }
    print(json.dumps(meta), flush=True)
    out = args.out / "tq4_speed.json"
    args.out.mkdir(parents=True, exist_ok=True)
    sizes: list[dict[str, Any]] = []
    gqa: list[dict[str, Any]] = []
    host: dict[str, Any] = {}
    cfgs: list[dict[str, Any]] = []

    def save() -> None:
        out.write_text(json.dumps({"meta": meta, "sizes": sizes, "gqa": gqa, "host": host,
                                   "configs": cfgs}, indent=1))  # fmt: skip

    if args.configs_only:
        args.batches = []
    else:
        host.update(host_costs())
        save()
    for b in args.batches:
        for t in args.tokens:
            sizes.append(sized(b, t, 32, graph=b == 1 or t <= args.graph_max))
            save()
    if not args.quick:  # the sweeps; --configs-only has no batches, so only its configurations
        for b in args.batches:
            for hq in (8, 32, 64):
                for t in (65536, 131072):
                    gqa.append(gqa_row(b, hq, t))
                    save()
        for t in (65536, 131072):
            cfgs.extend(configs(t))
            save()
    report(meta, sizes, gqa, host, cfgs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
