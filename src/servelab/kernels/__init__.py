"""Attention kernels and their references: CPU-paged attention, LSE merge, TurboQuant.

This package is the only part of servelab that imports torch.

- :mod:`servelab.kernels.reference` float64 reference attention (GQA, causal, window, soft-cap)
- :mod:`servelab.kernels.merge` merging partial (output, LSE) states
- :mod:`servelab.kernels.attention` the per-chunk attention step
  (bf16/fp16 reads, float32 accumulation and state)
- :mod:`servelab.kernels.staging` host-to-device block staging strategies
- :mod:`servelab.kernels.paged_cache` paged KV caches and block tables
- :mod:`servelab.kernels.paged` CPU-paged attention: the entry point; its checks, plan,
  copy/compute pipeline and per-chunk steps are ``paged_checks``, ``paged_plan``,
  ``paged_pipeline``, ``paged_steps`` (Triton kernels of the step: ``paged_step_triton``)
- :mod:`servelab.kernels.tolerance` the error rule kernel tests apply
"""

from __future__ import annotations

from servelab.kernels.merge import (
    empty_lse_to_neg_inf,
    lse_from_base2,
    lse_to_base2,
    merge_many,
    merge_states,
)
from servelab.kernels.paged import cpu_paged_attention, plan_chunks
from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.reference import reference_attention
from servelab.kernels.staging import GatherStrategy, StagingScratch, stage_blocks

__all__ = [
    "GatherStrategy",
    "PagedKVCache",
    "StagingScratch",
    "cpu_paged_attention",
    "empty_lse_to_neg_inf",
    "lse_from_base2",
    "lse_to_base2",
    "merge_many",
    "merge_states",
    "plan_chunks",
    "reference_attention",
    "stage_blocks",
]
