"""One decode call's inputs for the CPU-paged benchmarks that look inside a call
(paged_timeline.py, paged_host_phases.py): bf16, 8 KV / 64 query heads, head 128, block 256,
random host data behind a random block table, a one-block device suffix, one query token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelab.kernels.paged import cpu_paged_attention
from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.staging import StagingScratch

HKV, HEAD, GQA, BLOCK = 8, 128, 8, 256
DTYPE = torch.bfloat16


@dataclass
class DecodeInputs:
    ctx: int
    cache: PagedKVCache
    table: torch.Tensor
    gpu: PagedKVCache
    gpu_table: torch.Tensor
    scratch: StagingScratch
    query: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def build(cls, ctx: int, chunk: int) -> DecodeInputs:
        dev = torch.device("cuda")
        nb = ctx // BLOCK
        cache = PagedKVCache.allocate(
            num_blocks=nb + 8, block_size=BLOCK, num_kv_heads=HKV, head_size=HEAD, dtype=DTYPE,
            device="cpu", pin_memory=True,
        )  # fmt: skip
        cache.key.view(torch.int16).random_(-2000, 2000)
        cache.value.view(torch.int16).random_(-2000, 2000)
        table = torch.randperm(nb + 8, generator=torch.Generator().manual_seed(1))[:nb]
        gpu = PagedKVCache.allocate(
            num_blocks=2, block_size=BLOCK, num_kv_heads=HKV, head_size=HEAD, dtype=DTYPE,
            device=dev,
        )  # fmt: skip
        gpu.key.normal_()
        gpu.value.normal_()
        scratch = StagingScratch.allocate(
            chunk_blocks=chunk // BLOCK, block_size=BLOCK, num_kv_heads=HKV, head_size=HEAD,
            dtype=DTYPE, device=dev,
        )  # fmt: skip
        query = torch.randn(1, HKV * GQA, HEAD, device=dev, dtype=DTYPE)
        lse = torch.empty(1, HKV * GQA, device=dev)
        return cls(ctx, cache, table, gpu, torch.tensor([1]), scratch, query,
                   torch.empty_like(query), lse)  # fmt: skip

    def call(self, step: str = "auto", gather_kernel: str = "auto", strategy: str = "auto") -> None:
        cpu_paged_attention(
            self.query, self.cache, self.table, self.ctx, self.gpu, self.gpu_table, BLOCK,
            scratch=self.scratch, step=step, gather_kernel=gather_kernel, strategy=strategy,
            out=self.out, out_lse=self.lse,
        )  # fmt: skip
