"""Writes lab-cpu-paged-decode.npz: inputs and outputs of the lab's CPU-paged attention, in
the interface its design documents (docs/kernels-engine.md, "The lab's CPU-paged attention").

NOT a recording from a patched engine: the lab's patch (fixtures/patches/lab/
xpu-cpu-kv-worker-prototype-20260525.patch) is a placeholder in this repository. This file
synthesizes what that interface returns, step by step as the design notes describe it:
old blocks live in a host pool and are read through the request's block table; each chunk is
attended non-causally, as ``flash_attn_varlen_func(causal=False, return_softmax_lse=True)``
returns it (output [T, H, D] in the input dtype, LSE [H, T] float32, natural log); the
device-resident suffix likewise (a decode query sees all of it); the partials are folded with
``merge_attn_states`` (M = max lse; weights exp(lse - M); float32, one cast at the end).
Regenerate: ``.venv/bin/python tests/kernels/data/lab_paged_fixture.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("lab-cpu-paged-decode.npz")
SEED, HQ, HK, D, BLOCK, HOST_TOKENS, SUFFIX, CHUNK, POOL = 2020, 8, 2, 64, 16, 320, 48, 128, 24


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One non-causal chunk as FlashAttention returns it: fp32 math, output in q's dtype."""
    g = HQ // HK
    kf = k.float().repeat_interleave(g, dim=1)  # [T, Hq, D]
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) / math.sqrt(D)
    lse = torch.logsumexp(s, dim=-1)  # [H, Tq]
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("hqk,khd->qhd", p, vf)
    return out.to(q.dtype), lse


def main() -> None:
    g = torch.Generator().manual_seed(SEED)
    pool_k = torch.randn(POOL, BLOCK, HK, D, generator=g).half()
    pool_v = torch.randn(POOL, BLOCK, HK, D, generator=g).half()
    table = torch.randperm(POOL, generator=g)[: HOST_TOKENS // BLOCK].to(torch.int32)
    suffix_k = torch.randn(SUFFIX, HK, D, generator=g).half()
    suffix_v = torch.randn(SUFFIX, HK, D, generator=g).half()
    q = (torch.randn(1, HQ, D, generator=g) * 1.5).half()
    host_k = pool_k[table.long()].reshape(-1, HK, D)
    host_v = pool_v[table.long()].reshape(-1, HK, D)
    parts = [
        chunk_attention(q, host_k[s : s + CHUNK], host_v[s : s + CHUNK])
        for s in range(0, HOST_TOKENS, CHUNK)
    ]
    parts.append(chunk_attention(q, suffix_k, suffix_v))
    lses = torch.stack([lse for _, lse in parts])  # [P, H, Tq]
    m = lses.max(dim=0).values
    w = torch.exp(lses - m)
    lse = m + torch.log(w.sum(dim=0))
    out = sum(o.float() * torch.exp(part_lse - lse).T.unsqueeze(-1) for o, part_lse in parts)
    assert isinstance(out, torch.Tensor)
    meta = {
        "provenance": "synthesized by servelab from the lab's documented interface; NOT recorded "
        "from a patched engine (the lab's patch is a placeholder here)",
        "layouts": "q/out [T, Hq, D]; lse [Hq, T] natural log; pool [blocks, block, Hk, D]; "
        "block_table [blocks of the request]; suffix [T, Hk, D]",
        "chunks": [min(CHUNK, HOST_TOKENS - s) for s in range(0, HOST_TOKENS, CHUNK)],
        "seed": SEED,
    }
    np.savez_compressed(
        OUT,
        q=q.numpy(),
        pool_k=pool_k.numpy(),
        pool_v=pool_v.numpy(),
        block_table=table.numpy(),
        suffix_k=suffix_k.numpy(),
        suffix_v=suffix_v.numpy(),
        out=out.half().numpy(),
        lse=lse.numpy(),
        meta=np.array(json.dumps(meta)),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
