"""The per-chunk attention step as one Triton launch, and the final merge as one more.

The torch step (:mod:`servelab.kernels.attention`) costs about 24 kernel launches per chunk;
on an H100 the host needed ~0.6-0.9 ms to issue them against ~0.13 ms of device time per
32K-token chunk, so small contexts and small chunks were bound by the host, not the link
(docs/history/paged-attention.md, run 4). This module replaces the step by:

- :func:`attend_parts` — a split-K (flash-decoding) kernel: one program per (KV head,
  split of the key range, block of query rows) reads its keys and values once in their
  storage dtype, serves every query row of that KV head (grouped-query heads are never
  repeated), runs an online softmax in base 2 with float32 scores and state, and writes one
  partial ``(out, lse)`` per split into a preallocated buffer. No merge per chunk.
- :func:`merge_parts` — one program per query row folds every partial of the call (all
  chunks, all splits, and the device suffix) by log-sum-exp and writes the output in the
  query dtype and the natural-log LSE, already in the ``[T, Hq]`` layout.

Numerics follow the torch step: products of the stored dtype accumulate in float32 (fp32
caches use IEEE products, never TF32), probabilities are cast to the value dtype for P·V
(as FlashAttention), a row that sees no key gets output 0 and LSE −inf, never NaN.

Rows are ordered ``r = g * T + t`` (g: head within the group, t: query token), as the torch
step's head-major state. Arguments are trusted: :func:`servelab.kernels.paged.cpu_paged_attention`
validates them before anything is launched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from servelab.errors import KernelRuntimeError

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals declared as constexpr (Triton 3.6).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
# Programs per launch to aim for (per chunk): enough to cover the SMs a few times over.
TARGET_PROGRAMS = 256
# Shared memory the pipelined K/V tiles may take (bytes): leaves room for the operand
# conversions and for two programs per SM on an H100 (228 KiB per SM).
STAGE_BUDGET = 96 * 1024
MAX_BLOCK_ROWS = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tanh(x):  # type: ignore[no-untyped-def]
    # 1 - 2 / (e^{2x} + 1): saturates to ±1 without NaN (e^{2x} = inf gives 1, 0 gives -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit  # type: ignore[untyped-decorator]
def _split_attend_kernel(  # type: ignore[no-untyped-def]
    Q, sqt, sqh,
    K, V, skt, skh, svt, svh,
    PO, PL,
    num_keys, k_start, q_start, num_q, group, rows,
    scale, softcap, window,
    part_base, keys_per_split,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    split = tl.program_id(1)
    rb = tl.program_id(2)
    num_kv = tl.num_programs(0)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    g = offs_r // num_q
    t = offs_r % num_q
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + t[:, None] * sqt + (h * group + g)[:, None] * sqh + offs_d[None, :],
        mask=mask_r[:, None],
        other=0.0,
    )
    q_pos = q_start + t
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, num_keys)
    if CAUSAL:  # keys after the last query are visible to no row: never read them
        hi = tl.minimum(hi, q_start + num_q - k_start)
    k_base = K + h.to(tl.int64) * skh
    v_base = V + h.to(tl.int64) * svh

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        offs_n64 = offs_n.to(tl.int64)
        tile = offs_n64[:, None]
        k = tl.load(k_base + tile * skt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_SOFTCAP:  # noqa: SIM108 (constexpr branches compile to one side)
            s = softcap * _tanh((s * scale) / softcap) * _LOG2E
        else:
            s = s * (scale * _LOG2E)
        vis = mask_r[:, None] & mask_n[None, :]
        k_pos = k_start + offs_n
        if CAUSAL:
            vis = vis & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            vis = vis & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: shift by 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + tile * svt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * _LN2, float("-inf"))
    row = (part_base + split).to(tl.int64) * (num_kv * rows) + h * rows + offs_r
    tl.store(PO + row[:, None] * D + offs_d[None, :], out, mask=mask_r[:, None])
    tl.store(PL + row, lse, mask=mask_r)


@triton.jit  # type: ignore[untyped-decorator]
def _merge_parts_kernel(  # type: ignore[no-untyped-def]
    PO, PL, OUT, OUT_LSE, sot, soh, slt, slh,
    num_parts, num_kv, rows, num_q, group,
    D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (row, slice of BLOCK_D columns), so that hundreds of partials (many
    # chunks times many splits) are folded by many SMs at once.
    row = tl.program_id(0)  # h * rows + r
    h = row // rows
    r = row % rows
    g = r // num_q
    t = r % num_q
    per_part = num_kv * rows
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), 0)
    for p0 in range(0, num_parts, BLOCK_P):
        pp = p0 + offs_p
        lse = tl.load(
            PL + pp.to(tl.int64) * per_part + row, mask=pp < num_parts, other=float("-inf")
        )
        m = tl.maximum(m, tl.max(lse, 0))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.sum(tl.zeros([BLOCK_P], tl.float32), 0)
    for p0 in range(0, num_parts, BLOCK_P):
        pp = p0 + offs_p
        mask_p = pp < num_parts
        lse = tl.load(PL + pp.to(tl.int64) * per_part + row, mask=mask_p, other=float("-inf"))
        w = tl.exp(lse - m_use)
        o = tl.load(
            PO + (pp.to(tl.int64) * per_part + row)[:, None] * D + offs_d[None, :],
            mask=mask_p[:, None],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * o, 0)
        den += tl.sum(w, 0)
    has = den > 0.0
    out = acc / tl.where(has, den, 1.0)
    lse_out = tl.where(has, m_use + tl.log(tl.where(has, den, 1.0)), float("-inf"))
    head = h * group + g
    tl.store(OUT + t * sot + head * soh + offs_d, out.to(OUT.dtype.element_ty))
    tl.store(OUT_LSE + t * slt + head * slh, lse_out)


def supported(query: torch.Tensor, key_dtype: torch.dtype) -> bool:
    """Whether the Triton step can serve this call (device, dtype, head size)."""
    d = int(query.shape[-1])
    return (
        query.device.type in ("cuda", "xpu")
        and query.dtype in DTYPES
        and key_dtype == query.dtype
        and d >= 16
        and d & (d - 1) == 0
    )


@dataclass
class Parts:
    """Preallocated partial states of one call: ``out [P, Hkv*R, D]``, ``lse [P, Hkv*R]``."""

    out: torch.Tensor
    lse: torch.Tensor
    used: int = 0

    @classmethod
    def allocate(cls, capacity: int, num_kv_heads: int, rows: int, head_size: int,
                 device: torch.device) -> Parts:  # fmt: skip
        capacity = max(1, capacity)
        shape = (capacity, num_kv_heads * rows)
        out = torch.empty(*shape, head_size, dtype=torch.float32, device=device)
        lse = torch.empty(shape, dtype=torch.float32, device=device)
        return cls(out, lse)


def tile_config(head_size: int, element_size: int) -> tuple[int, int]:
    """``(keys per tile, pipeline stages)`` whose K and V tiles fit :data:`STAGE_BUDGET`."""
    block_n = 64 if head_size * element_size <= 256 else 32
    tile = 2 * block_n * head_size * element_size
    return block_n, max(1, min(3, STAGE_BUDGET // tile))


def splits_for(num_keys: int, num_kv_heads: int, row_blocks: int, block_n: int) -> int:
    """Splits of a key range: about :data:`TARGET_PROGRAMS` programs, at least one tile each."""
    tiles = max(1, int(triton.cdiv(num_keys, block_n)))
    want = max(1, TARGET_PROGRAMS // max(1, num_kv_heads * row_blocks))
    return min(tiles, want)


def block_rows(rows: int) -> int:
    return min(MAX_BLOCK_ROWS, max(16, int(triton.next_power_of_2(rows))))


def attend_parts(
    parts: Parts,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
    num_splits: int | None = None,
) -> None:
    """Enqueue attention of ``query [T, Hq, D]`` over ``key``/``value`` ``[S, Hkv, D]``
    (last dim contiguous) at positions ``k_start..``, appending its partials to ``parts``."""
    num_q, num_heads, head_size = query.shape
    num_keys, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    rows = group * num_q
    br = block_rows(rows)
    row_blocks = triton.cdiv(rows, br)
    block_n, stages = tile_config(head_size, key.element_size())
    splits = num_splits or splits_for(num_keys, num_kv_heads, row_blocks, block_n)
    if parts.used + splits > parts.out.shape[0]:
        raise KernelRuntimeError(
            f"attend_parts: the partial buffer holds {parts.out.shape[0]} parts, "
            f"{parts.used + splits} needed; size it with splits_for over every range to come"
        )
    per_split = triton.cdiv(max(1, num_keys), splits)
    per_split = triton.cdiv(per_split, block_n) * block_n
    grid = (num_kv_heads, splits, row_blocks)
    _split_attend_kernel[grid](
        query, query.stride(0), query.stride(1),
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        parts.out, parts.lse,
        num_keys, k_start, q_start, num_q, group, rows,
        float(scale), float(softcap or 1.0), int(window or 0),
        parts.used, per_split,
        D=head_size, BLOCK_R=br, BLOCK_N=block_n,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # tf32: unused for 16-bit
        num_warps=4, num_stages=stages if query.device.type == "cuda" else 1,
    )  # fmt: skip
    parts.used += splits


def merge_parts(parts: Parts, out: torch.Tensor, out_lse: torch.Tensor, num_kv_heads: int) -> None:
    """Fold every partial into ``out [T, Hq, D]`` (its dtype) and ``out_lse [T, Hq]``."""
    num_q, num_heads, head_size = out.shape
    group = num_heads // num_kv_heads
    rows = group * num_q
    if parts.used == 0:
        out.zero_()
        out_lse.fill_(-math.inf)
        return
    block_p = min(64, triton.next_power_of_2(parts.used))
    block_d = min(head_size, 32)
    _merge_parts_kernel[(num_kv_heads * rows, head_size // block_d)](
        parts.out, parts.lse, out, out_lse,
        out.stride(0), out.stride(1), out_lse.stride(0), out_lse.stride(1),
        parts.used, num_kv_heads, rows, num_q, group,
        D=head_size, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
