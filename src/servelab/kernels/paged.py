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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from servelab.errors import KernelInputError
from servelab.kernels import decode_triton
from servelab.kernels.attention import (
    accumulate,
    chunk_fully_masked,
    finalize,
    new_state,
    prepare_query,
)
from servelab.kernels.paged_args import CallArgs, check_call
from servelab.kernels.paged_cache import PagedKVCache, blocks_for
from servelab.kernels.staging import (
    GatherKernel,
    GatherStrategy,
    StagingScratch,
    stage_blocks,
)
from servelab.kernels.validation import (
    require_int,
)


@dataclass(frozen=True)
class Chunk:
    """Blocks ``[block_start, block_end)`` of the host part, tokens ``[token_start, token_end)``."""

    block_start: int
    block_end: int
    token_start: int
    token_end: int


def plan_chunks(num_tokens: int, block_size: int, chunk_blocks: int) -> tuple[Chunk, ...]:
    """Whole-block chunks covering tokens ``[0, num_tokens)`` in order.

    >>> [(c.token_start, c.token_end) for c in plan_chunks(600, 256, 2)]
    [(0, 512), (512, 600)]
    """
    n_blocks = blocks_for(num_tokens, block_size)
    chunks = []
    for b0 in range(0, n_blocks, chunk_blocks):
        b1 = min(n_blocks, b0 + chunk_blocks)
        chunks.append(Chunk(b0, b1, b0 * block_size, min(num_tokens, b1 * block_size)))
    return tuple(chunks)


def check_plan(chunks: tuple[Chunk, ...], num_tokens: int, block_size: int) -> None:
    """Raise unless the chunks cover ``[0, num_tokens)`` exactly once, in order.

    A chunk counted twice shifts the LSE by ln 2 (between equal-mass chunks) without
    necessarily moving the output much; this catches it structurally.
    """
    pos = 0
    for i, c in enumerate(chunks):
        if c.token_start != pos:
            what = "overlaps the previous one" if c.token_start < pos else "leaves a gap"
            raise KernelInputError(
                f"chunk {i} starts at token {c.token_start} but the previous chunk ended at "
                f"{pos}: it {what}. Chunks must tile [0, {num_tokens}) once, in order"
            )
        if c.token_start != c.block_start * block_size or c.token_end <= c.token_start:
            raise KernelInputError(f"chunk {i} ({c}) is not a non-empty whole-block range")
        if c.token_end > min(num_tokens, c.block_end * block_size):
            raise KernelInputError(f"chunk {i} ({c}) runs past its blocks or the host part")
        pos = c.token_end
    if pos != num_tokens:
        raise KernelInputError(f"chunks cover [0, {pos}) but the host part holds {num_tokens}")


_COPY_STREAMS: dict[tuple[str, int], Any] = {}


def _copy_stream(mod: Any, device: torch.device) -> Any:
    """One copy stream per device, kept across calls (creating one costs host time)."""
    index = device.index if device.index is not None else mod.current_device()
    key = (device.type, int(index))
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = mod.Stream(device)
    return _COPY_STREAMS[key]


class _Streams:
    """Copy and compute streams for one call; no-ops on a CPU device."""

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self._mod: Any = getattr(torch, device.type) if device.type in ("cuda", "xpu") else None
        self.compute: Any = None
        self.copy: Any = None
        if self._mod is not None:
            self.compute = self._mod.current_stream(device)
            self.copy = _copy_stream(self._mod, device) if overlap else self.compute

    @contextlib.contextmanager
    def on_copy(self) -> Iterator[None]:
        if self._mod is None or self.copy is self.compute:
            yield
            return
        with self._mod.stream(self.copy):
            yield

    def record(self, stream: Any) -> Any:
        return None if stream is None else stream.record_event()

    def wait(self, stream: Any, event: Any) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    def copy_waits_compute(self) -> None:
        if self.copy is not None and self.copy is not self.compute:
            self.copy.wait_stream(self.compute)


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
    :mod:`~servelab.kernels.decode_triton`), ``"torch"`` (plain torch operations, any
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
    chunk_blocks, checked = check_call(args, strategy, gather_kernel, step)
    if gather_programs is not None:
        require_int("gather_programs", gather_programs, minimum=1)
    use_triton, resolved, kernel = checked.use_triton, checked.strategy, checked.kernel
    device = query.device
    num_q, num_heads, head_size = query.shape
    sm_scale = 1.0 / math.sqrt(head_size) if scale is None else scale
    q_start = cpu_len + gpu_len - num_q
    bs = cpu_cache.block_size
    chunks = tuple(
        c
        for c in plan_chunks(cpu_len, bs, chunk_blocks)
        if not chunk_fully_masked(
            q_start=q_start,
            num_queries=num_q,
            k_start=c.token_start,
            num_keys=c.token_end - c.token_start,
            causal=causal,
            window=window,
        )
    )
    streams = _Streams(device, overlap)
    h, d = cpu_cache.num_kv_heads, cpu_cache.head_size
    suffix_visible = gpu_len > 0 and not chunk_fully_masked(
        q_start=q_start,
        num_queries=num_q,
        k_start=cpu_len,
        num_keys=gpu_len,
        causal=causal,
        window=window,
    )

    buffers = scratch.buffers
    slot_free: list[Any] = [None] * buffers
    pack_done: list[Any] = [None] * buffers
    staged: list[Any] = [None] * len(chunks)
    pack = resolved is GatherStrategy.CPU_PACK and device.type != "cpu"
    cuda_gather = resolved is GatherStrategy.GPU_GATHER and kernel is GatherKernel.CUDA
    # Both ways through the C library take the copy stream's handle: no switch of torch's
    # current stream.
    raw_stream = cuda_gather or resolved is GatherStrategy.COPY_BATCH
    ids_host = ids_dev = None
    ring_slot = 0
    if chunks and cuda_gather:
        # The kernel reads the ids from a pinned buffer when it runs: no device copy, and a
        # ring buffer no pending launch still reads (its guard: the last staging event).
        n_ids = chunks[-1].block_end
        ring_slot, ring_buf = scratch.id_ring.acquire(n_ids)
        ids_host = ring_buf[:n_ids]
        ids_host.copy_(cpu_block_table[:n_ids])
    elif chunks:
        # copy_batch reads the ids on the host during each call: any contiguous int64 tensor.
        ids_host = cpu_block_table[: chunks[-1].block_end].to(torch.int64).contiguous()
        if resolved is GatherStrategy.GPU_GATHER:
            ids_dev = ids_host.to(device)
    if chunks:
        streams.copy_waits_compute()

    def stage(j: int) -> None:
        c, slot = chunks[j], j % buffers
        assert ids_host is not None  # narrowing: only called when there are chunks
        with contextlib.nullcontext() if raw_stream else streams.on_copy():
            streams.wait(streams.copy, slot_free[slot])
            if pack and pack_done[slot] is not None:
                pack_done[slot].synchronize()  # the host rewrites this pack slot next
            stage_blocks(
                cpu_cache.key,
                cpu_cache.value,
                ids_host[c.block_start : c.block_end],
                scratch.key[slot],
                scratch.value[slot],
                strategy=resolved,
                device_ids=None if ids_dev is None else ids_dev[c.block_start : c.block_end],
                pack_key=None if scratch.pack_key is None else scratch.pack_key[slot],
                pack_value=None if scratch.pack_value is None else scratch.pack_value[slot],
                programs=gather_programs,
                kernel=GatherKernel.CUDA if cuda_gather else GatherKernel.TRITON,
                stream=streams.copy,
            )
            staged[j] = streams.record(streams.copy)
        if cuda_gather:
            scratch.id_ring.guard(ring_slot, staged[j])
        if pack:
            pack_done[slot] = staged[j]

    # Copies run ahead of the attention by up to buffers - 1 chunks, so the copy stream
    # already holds the next chunk while the host issues this chunk's attention.
    issued = 0
    while issued < min(len(chunks), max(1, buffers - 1)):
        stage(issued)
        issued += 1
    # Set-up the first copy does not need comes after it: its launch is what the link waits
    # for (with one 32K-token chunk the call is the copy plus this host time).
    mask = _Mask(sm_scale, q_start, causal, window, softcap)
    steps: _TritonSteps | _TorchSteps
    if use_triton:
        ranges = [c.token_end - c.token_start for c in chunks]
        steps = _TritonSteps(query, h, mask, ranges + ([gpu_len] if suffix_visible else []))
    else:
        steps = _TorchSteps(query, h, mask)
    if suffix_visible:  # the suffix needs no staging and overlaps the first copy
        k_suf, v_suf = gpu_cache.read(gpu_block_table, gpu_len)
        steps.attend(k_suf, v_suf, cpu_len)
    for i, c in enumerate(chunks):
        while issued < min(len(chunks), i + buffers):
            stage(issued)
            issued += 1
        slot = i % buffers
        nb, ntok = c.block_end - c.block_start, c.token_end - c.token_start
        streams.wait(streams.compute, staged[i])
        k = scratch.key[slot, :nb].reshape(nb * bs, h, d)[:ntok]
        v = scratch.value[slot, :nb].reshape(nb * bs, h, d)[:ntok]
        steps.attend(k, v, c.token_start)
        slot_free[slot] = streams.record(streams.compute)
    if pack:
        # The next call may rewrite the pack buffers as soon as this one returns.
        for ev in pack_done:
            if ev is not None:
                ev.synchronize()

    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if out_lse is None:
        out_lse = torch.empty(num_q, num_heads, dtype=torch.float32, device=device)
    steps.finish(out, out_lse)
    return out, out_lse


@dataclass(frozen=True)
class _Mask:
    """What every range of one call is attended with."""

    scale: float
    q_start: int
    causal: bool
    window: int | None
    softcap: float | None


class _TorchSteps:
    """The torch step (any device): each range folded into a float32 running state."""

    def __init__(self, query: torch.Tensor, num_kv_heads: int, mask: _Mask) -> None:
        self.num_q = int(query.shape[0])
        self.mask = mask
        self.pq = prepare_query(query, mask.scale, num_kv_heads)
        self.state = new_state(num_kv_heads, self.pq.rows, int(query.shape[2]), query.device)

    def attend(self, key: torch.Tensor, value: torch.Tensor, k_start: int) -> None:
        m = self.mask
        self.state = accumulate(
            self.state,
            self.pq,
            key,
            value,
            num_q=self.num_q,
            q_start=m.q_start,
            k_start=k_start,
            causal=m.causal,
            window=m.window,
            softcap=m.softcap,
        )

    def finish(self, out: torch.Tensor, out_lse: torch.Tensor) -> None:
        final_out, final_lse = finalize(self.state, self.num_q)
        out.copy_(final_out)  # the one cast to the query dtype
        out_lse.copy_(final_lse)


class _TritonSteps:
    """The Triton step: partials of every range into one buffer sized up front (``ranges``:
    the key count of each range to come), one merge at the end."""

    def __init__(
        self, query: torch.Tensor, num_kv_heads: int, mask: _Mask, ranges: list[int]
    ) -> None:
        self.query = query if query.stride(-1) == 1 else query.contiguous()
        self.num_kv_heads = num_kv_heads
        self.mask = mask
        num_q, num_heads, head_size = query.shape
        rows = num_heads // num_kv_heads * num_q
        row_blocks = -(-rows // decode_triton.block_rows(rows))
        block_n, _ = decode_triton.tile_config(head_size, query.element_size())
        total = sum(decode_triton.splits_for(n, num_kv_heads, row_blocks, block_n) for n in ranges)
        self.parts = decode_triton.Parts.allocate(
            total, num_kv_heads, rows, head_size, query.device
        )

    def attend(self, key: torch.Tensor, value: torch.Tensor, k_start: int) -> None:
        m = self.mask
        decode_triton.attend_parts(
            self.parts,
            self.query,
            key,
            value,
            scale=m.scale,
            q_start=m.q_start,
            k_start=k_start,
            causal=m.causal,
            window=m.window,
            softcap=m.softcap,
        )

    def finish(self, out: torch.Tensor, out_lse: torch.Tensor) -> None:
        if out.stride(-1) == 1:
            decode_triton.merge_parts(self.parts, out, out_lse, self.num_kv_heads)
            return
        tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
        decode_triton.merge_parts(self.parts, tmp, out_lse, self.num_kv_heads)
        out.copy_(tmp)
