"""Host time of one CPU-paged decode call, by function (cProfile over repeated calls).

PYTHONPATH=src python3 benchmarks/kernels/paged_host_profile.py [ctx] [chunk]
"""

from __future__ import annotations

import cProfile
import pstats
import sys

import torch

from servelab.kernels.paged import cpu_paged_attention
from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.staging import StagingScratch

HKV, HEAD, GQA, BLOCK = 8, 128, 8, 256


def main() -> int:
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    dev = torch.device("cuda")
    dt = torch.bfloat16
    nb = ctx // BLOCK
    cache = PagedKVCache.allocate(
        num_blocks=nb + 8, block_size=BLOCK, num_kv_heads=HKV, head_size=HEAD, dtype=dt,
        device="cpu", pin_memory=True,
    )  # fmt: skip
    table = torch.randperm(nb + 8)[:nb]
    gpu = PagedKVCache.allocate(
        num_blocks=2, block_size=BLOCK, num_kv_heads=HKV, head_size=HEAD, dtype=dt, device=dev
    )
    scratch = StagingScratch.allocate(
        chunk_blocks=chunk // BLOCK, block_size=BLOCK, num_kv_heads=HKV, head_size=HEAD,
        dtype=dt, device=dev,
    )  # fmt: skip
    query = torch.randn(1, HKV * GQA, HEAD, device=dev, dtype=dt)
    out = torch.empty_like(query)
    lse = torch.empty(1, HKV * GQA, device=dev)
    gtable = torch.tensor([1])

    def call() -> None:
        cpu_paged_attention(
            query, cache, table, ctx, gpu, gtable, BLOCK, scratch=scratch, out=out, out_lse=lse
        )

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    for _ in range(30):
        prof.enable()
        call()
        prof.disable()
        torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
