"""CPU-paged attention over a host-resident prefix and a device-resident suffix.

A sequence's KV lives in two paged caches: old blocks in host memory (pinned, so the device
can read them at link speed) and the recent suffix in device memory. Attention for the
queries (the last T tokens of the sequence, causal, aligned bottom-right) is:

1. the device suffix, attended directly (causal);
2. the host part, staged chunk by chunk into a reusable device scratch on a copy stream
   while the previous chunk is attended on the compute stream (two scratch slots, events
   between the streams), each chunk attended with its LSE and folded into a running float32
   state with :func:`~servelab.kernels.merge.merge_states`;
3. the two merged, cast once to the query dtype.

Chunks are whole blocks. A chunk no query can see (sliding window) is never staged.
Everything runs the same way on ``cpu`` (no streams), ``cuda`` and ``xpu``; only the
``copy_batch`` and ``gpu_gather`` staging strategies are CUDA-only, and ``auto`` falls back
from them.

This module is the entry point only; the call is checked (:mod:`.paged_checks`), planned
(:mod:`.paged_plan`), staged and attended (:mod:`.paged_pipeline`) with a per-chunk step
(:mod:`.paged_steps`).
"""

from __future__ import annotations

import torch

from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.paged_checks import CallArgs, PagedOptions, check_call
from servelab.kernels.paged_pipeline import Staging
from servelab.kernels.paged_pipeline import run as pipeline_run
from servelab.kernels.paged_plan import Chunk, check_plan, plan_call, plan_chunks
from servelab.kernels.paged_steps import Step, TorchStep, TritonStep
from servelab.kernels.staging import GatherKernel, GatherStrategy, StagingScratch

__all__ = ["Chunk", "PagedOptions", "check_plan", "cpu_paged_attention", "plan_chunks"]


def cpu_paged_attention(
    query: torch.Tensor,
    cpu_cache: PagedKVCache,
    cpu_block_table: torch.Tensor,
    cpu_len: int,
    gpu_cache: PagedKVCache,
    gpu_block_table: torch.Tensor,
    gpu_len: int,
    *,
    scratch: StagingScratch,
    chunk_tokens: int | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    strategy: str | GatherStrategy = "auto",
    overlap: bool = True,
    gather_programs: int | None = None,
    gather_kernel: str | GatherKernel = "auto",
    step: str = "auto",
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[T, Hq, D]`` over ``cpu_len`` host tokens then ``gpu_len``
    device tokens; returns ``(out [T, Hq, D] in the query dtype, lse [T, Hq] float32)``.

    The queries are the last T positions of the sequence (``q_start = cpu_len + gpu_len -
    T``). ``chunk_tokens`` (default: the scratch's size) is rounded down to whole blocks.
    ``gather_programs`` caps the ``gpu_gather`` kernel's persistent grid (default
    :data:`~servelab.kernels.gather_triton.PROGRAMS`, which leaves most SMs to the
    attention running beside it). ``gather_kernel`` picks the ``gpu_gather`` kernel:
    ``"cuda"`` (:mod:`~servelab.kernels.gather_cuda`: nvcc-built, ids read from pinned
    host memory, no stream switch), ``"triton"`` or ``"auto"`` (CUDA where nvcc is found).
    ``step`` picks the per-chunk attention: ``"triton"`` (one
    split-K launch per chunk and one merge launch per call,
    :mod:`~servelab.kernels.paged_step_triton`), ``"torch"`` (plain torch operations, any
    device) or ``"auto"`` (Triton where it runs: CUDA/XPU, power-of-two head size).
    ``out``/``out_lse``, when given, are written in place.
    Every argument is checked before
    anything is launched; a bad one raises :class:`~servelab.errors.KernelInputError`.
    Checks that depend only on the layout of the caches, the scratch and the query are
    remembered by the scratch (``scratch.checks``) and skipped when a call repeats them;
    lengths, block ids and scalars are checked on every call.
    """
    args = CallArgs(
        query, cpu_cache, cpu_block_table, cpu_len, gpu_cache, gpu_block_table, gpu_len,
        scratch, chunk_tokens, scale, window, softcap, out, out_lse,
    )  # fmt: skip
    options = PagedOptions(strategy, overlap, gather_programs, gather_kernel, step)
    chunk_blocks, checked = check_call(args, options)
    num_q, num_heads, head_size = query.shape
    plan = plan_call(
        num_q=num_q,
        head_size=head_size,
        cpu_len=cpu_len,
        gpu_len=gpu_len,
        block_size=cpu_cache.block_size,
        chunk_blocks=chunk_blocks,
        scale=scale,
        causal=causal,
        window=window,
        softcap=softcap,
    )
    num_kv_heads = cpu_cache.num_kv_heads

    def make_step() -> Step:
        if checked.use_triton:
            return TritonStep(query, num_kv_heads, plan.mask, plan.ranges(gpu_len))
        return TorchStep(query, num_kv_heads, plan.mask)

    def attend_suffix(step: Step) -> None:
        k_suf, v_suf = gpu_cache.read(gpu_block_table, gpu_len)
        step.attend(k_suf, v_suf, cpu_len)

    staging = Staging(cpu_cache, cpu_block_table, scratch, checked, overlap, gather_programs)
    final = pipeline_run(plan, staging, query.device, make_step, attend_suffix)
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if out_lse is None:
        out_lse = torch.empty(num_q, num_heads, dtype=torch.float32, device=query.device)
    final.finish(out, out_lse)
    return out, out_lse
