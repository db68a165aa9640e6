"""The plan of one ``cpu_paged_attention`` call: which host chunks to stage, in which order,
and what every attended range is masked with.

Chunks are whole blocks of the host part, in order. A chunk no query can see (sliding
window) is left out of the plan, so it is never staged; the device suffix is attended only
if some query sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from servelab.errors import KernelInputError
from servelab.kernels.attention import chunk_fully_masked
from servelab.kernels.paged_cache import blocks_for


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


@dataclass(frozen=True)
class Mask:
    """What every range of one call is attended with."""

    scale: float
    q_start: int
    causal: bool
    window: int | None
    softcap: float | None


@dataclass(frozen=True)
class CallPlan:
    """The host chunks to stage (visible ones only), whether the device suffix is seen, and
    the mask every range shares."""

    chunks: tuple[Chunk, ...]
    suffix_visible: bool
    mask: Mask

    def ranges(self, gpu_len: int) -> list[int]:
        """Key count of every range to attend, in order: the chunks, then the suffix."""
        sizes = [c.token_end - c.token_start for c in self.chunks]
        return sizes + ([gpu_len] if self.suffix_visible else [])


def plan_call(
    *,
    num_q: int,
    head_size: int,
    cpu_len: int,
    gpu_len: int,
    block_size: int,
    chunk_blocks: int,
    scale: float | None,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> CallPlan:
    """The plan for queries that are the last ``num_q`` positions of a sequence of
    ``cpu_len`` host then ``gpu_len`` device tokens (arguments already checked)."""
    q_start = cpu_len + gpu_len - num_q

    def visible(k_start: int, num_keys: int) -> bool:
        return not chunk_fully_masked(
            q_start=q_start,
            num_queries=num_q,
            k_start=k_start,
            num_keys=num_keys,
            causal=causal,
            window=window,
        )

    chunks = tuple(
        c
        for c in plan_chunks(cpu_len, block_size, chunk_blocks)
        if visible(c.token_start, c.token_end - c.token_start)
    )
    sm_scale = 1.0 / math.sqrt(head_size) if scale is None else scale
    mask = Mask(sm_scale, q_start, causal, window, softcap)
    return CallPlan(chunks, gpu_len > 0 and visible(cpu_len, gpu_len), mask)
