"""Triton attention over one key range, folded straight into a running (output, LSE) state.

Why it exists: the torch-op chunk step (:mod:`servelab.kernels.attention`) launches ~40
small kernels per chunk, and the host time to issue them (~0.7 ms per chunk on the H100
machine) exceeded the time to stage the chunk, so the pipeline was host-bound and overlap
bought nothing (docs/kernels-paged.md). This kernel does scores, masking, online softmax,
P·V and the LSE merge into the running state in one launch.

Numerics match the torch path: inputs are upcast to float32 in registers and every dot
runs in IEEE float32 (not TF32), including P·V on float32 probabilities. Decode is bound by
reading keys and values, so the FMA dots cost nothing measurable there. One program
handles one KV head and ``BLOCK_M`` rows of (query token, query head in the group), so keys
are read once per group (GQA without repeats).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 64


@triton.jit  # type: ignore[untyped-decorator]
def _attend_merge_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    acc_o_ptr,
    acc_lse_ptr,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lt,
    num_q,
    num_keys,
    group,
    q_start,
    k_start,
    scale,
    softcap,
    window,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HEAD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BM + tl.arange(0, BM)
    t = rows // group
    h = kvh * group + rows % group
    row_ok = t < num_q
    d = tl.arange(0, HEAD)
    q = tl.load(
        q_ptr + t[:, None].to(tl.int64) * stride_qt + h[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    qpos = q_start + t
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, HEAD], tl.float32)
    for n0 in range(0, num_keys, BN):
        kidx = n0 + tl.arange(0, BN)
        k_ok = kidx < num_keys
        k = tl.load(
            k_ptr + kidx[:, None].to(tl.int64) * stride_kn + kvh * stride_kh + d[None, :],
            mask=k_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1), exact limits at +-inf.
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        visible = row_ok[:, None] & k_ok[None, :]
        kpos = k_start + kidx
        if CAUSAL:
            visible = visible & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            visible = visible & ((qpos[:, None] - kpos[None, :]) < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + kidx[:, None].to(tl.int64) * stride_vn + kvh * stride_vh + d[None, :],
            mask=k_ok[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    has = l_i > 0.0
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse_c = tl.where(has, m_fin + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_c = acc / tl.where(has, l_i, 1.0)[:, None]
    # Fold into the running state: weights first, relative to the max, empty-safe.
    o_ptrs = acc_o_ptr + t[:, None].to(tl.int64) * stride_ot + h[:, None] * stride_oh + d[None, :]
    l_ptrs = acc_lse_ptr + t.to(tl.int64) * stride_lt + h
    old_o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
    old_l = tl.load(l_ptrs, mask=row_ok, other=float("-inf"))
    big = tl.maximum(old_l, lse_c)
    big_safe = tl.where(big == float("-inf"), 0.0, big)
    wa = tl.exp(old_l - big_safe)
    wb = tl.exp(lse_c - big_safe)
    total = wa + wb
    denom = tl.where(total > 0.0, total, 1.0)
    new_o = (wa / denom)[:, None] * old_o + (wb / denom)[:, None] * o_c
    new_l = big_safe + tl.log(total)
    tl.store(o_ptrs, new_o, mask=row_ok[:, None])
    tl.store(l_ptrs, new_l, mask=row_ok)


def supported(query: torch.Tensor, head_size: int) -> bool:
    """Shapes and dtypes this kernel handles (power-of-two head 16..256, half/float)."""
    return (
        query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 16 <= head_size <= 256
        and head_size & (head_size - 1) == 0
    )


def attend_merge(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
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
) -> None:
    """Fold attention of ``query`` over ``key``/``value`` into ``(acc_out, acc_lse)`` in place.

    ``acc_out`` float32 ``[T, Hq, D]`` and ``acc_lse`` float32 ``[T, Hq]`` with unit stride on
    the last dimension; ``query`` ``[T, Hq, D]``, ``key``/``value`` ``[S, Hkv, D]`` with unit
    stride on ``D``. Trusted arguments (the caller validates).
    """
    num_q, num_heads, head = query.shape
    num_keys, num_kv_heads, _ = key.shape
    if num_keys == 0 or num_q == 0:
        return
    group = num_heads // num_kv_heads
    grid = (num_kv_heads, triton.cdiv(num_q * group, BLOCK_M))
    # float32 inputs must not round to TF32; half inputs ignore the setting.
    precision = "ieee"
    _attend_merge_kernel[grid](
        query,
        key,
        value,
        acc_out,
        acc_lse,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        acc_out.stride(0),
        acc_out.stride(1),
        acc_lse.stride(0),
        num_q,
        num_keys,
        group,
        q_start,
        k_start,
        scale,
        softcap if softcap is not None else 1.0,
        window if window is not None else 1,
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        HEAD=head,
        BM=BLOCK_M,
        BN=BLOCK_N,
        PRECISION=precision,
        num_warps=4,
    )
