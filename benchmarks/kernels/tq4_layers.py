"""Per-call time of decode attention inside one CUDA graph of 8 calls over 8 layers' own K/V
(as a model's decode step runs its layers): the CUDA TurboQuant kernel (default
configuration, with and without programmatic dependent launch) and torch SDPA over bf16,
side by side, over a list of context lengths, so the
fixed cost of a call (its intercept) and the cost per token (its slope) can be read off.

One query token, batch 1, 32 query heads over 8 KV heads, head size 128, random bf16 q/K/V;
each time is the median of do_bench over replays of the graph (L2 flushed before each
replay), divided by 8.

    python benchmarks/kernels/tq4_layers.py --out DIR [--tokens 16384 32768 65536 131072]

Writes DIR/tq4_layers.json and prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from turboquant_decode import PRESET, D, bench_inputs, graph_bench

from servelab.kernels import cuda_ext
from servelab.kernels.turboquant import KVCodec
from servelab.kernels.turboquant.fused_decode import (
    DecodeConstants,
    LaunchConfig,
    fused_decode_attention,
)

LAYERS = 8


def layer_times(tokens: int, cfgs: dict[str, LaunchConfig], sdpa: bool) -> dict[str, float]:
    """µs per call inside one CUDA graph of LAYERS calls over LAYERS layers' own K/V, for the
    CUDA kernel under each named configuration and (``sdpa``) for torch SDPA over bf16."""
    codec = KVCodec.build(PRESET, D)
    qs, caches, kvs = [], [], []
    for _ in range(LAYERS):
        q, k, v = bench_inputs(tokens)
        qs.append(q)
        caches.append(codec.encode(k, v))
        if sdpa:
            kvs.append((k, v))
    consts = DecodeConstants.build(codec, qs[0].device)
    res: dict[str, float] = {}
    for key, cfg in cfgs.items():

        def tq_all(cfg: LaunchConfig = cfg) -> None:
            for q, cache in zip(qs, caches, strict=True):
                fused_decode_attention(q, cache, codec, constants=consts, config=cfg,
                                       check_values=False)  # fmt: skip

        res[key] = 1e3 * graph_bench(tq_all) / LAYERS
    if sdpa:

        def sdpa_all() -> None:
            for q, (k, v) in zip(qs, kvs, strict=True):
                F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)

        res["sdpa_us"] = 1e3 * graph_bench(sdpa_all) / LAYERS
    return res


def run(tokens: int, sdpa: bool, warps8: bool) -> dict[str, float]:
    cfgs = {
        "cuda_us": LaunchConfig(backend="cuda"),
        "cuda_nopdl_us": LaunchConfig(backend="cuda", cuda_pdl=False),
    }
    if warps8:
        cfgs["cuda_w8_us"] = LaunchConfig(backend="cuda", cuda_warps=8)
    res: dict[str, float] = {"tokens": tokens, **layer_times(tokens, cfgs, sdpa)}
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--no-sdpa", action="store_true", help="time the CUDA kernel only")
    ap.add_argument("--warps8", action="store_true", help="also 8 warps a CTA (two CTAs an SM)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not cuda_ext.enabled(torch.device("cuda")):
        print("needs a CUDA device and nvcc", file=sys.stderr)
        return 2
    meta = {
        "card": torch.cuda.get_device_name(0),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "shape": f"batch 1, 1 query token, 32 q heads / 8 KV heads, d={D}, {PRESET}",
        "timing": f"median of do_bench over replays of one graph of {LAYERS} calls, / {LAYERS}",
    }
    print(json.dumps(meta), flush=True)
    results = [run(t, not args.no_sdpa, args.warps8) for t in args.tokens]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tq4_layers.json").write_text(json.dumps({"meta": meta, "results": results}))
    print("\n| tokens | CUDA TQ4 (µs/call) | without PDL | SDPA bf16 (µs/call) | ratio |")
    print("|---|---|---|---|---|")
    for r in results:
        s = r.get("sdpa_us")
        cells = f"{s:.1f} | {s / r['cuda_us']:.2f}x" if s else "- | -"
        print(f"| {r['tokens']} | {r['cuda_us']:.1f} | {r['cuda_nopdl_us']:.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
