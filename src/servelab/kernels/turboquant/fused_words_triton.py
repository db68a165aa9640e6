"""Split-KV decode over 4-bit keys and values, read as 32-bit words (``turboquant_4bit_nc``).

Each int32 word of a packed row holds 8 codes, coordinates 8w..8w+7 in order (little-endian
nibbles, low nibble first: packing.py's layout), so a thread that loads a word expands it to
8 consecutive coordinates with shifts alone; the [BLOCK_N, W, 8] expansion reshapes to the
[BLOCK_N, d] tile the matrix unit takes, with no interleave or shuffle:

- keys: one gather per code from the 16-entry fp16 table of √d-scaled centroids (32 bytes,
  one L1 sector), scored against the rotated query (fp16) on the matrix unit, times the
  stored per-token scale (fp16 → fp32);
- values: code n becomes the fp16 bit pattern 0x6400 | n, the number 1024 + n, with one OR,
  and 1024 is subtracted in fp16 (exact), so the matrix unit gets n itself and computes
  Σ r·n with r = fp16(p·scale); the zero point adds Σ p·zero. (Keeping the 1024 bias and
  removing 1024·Σ r at the end was 3e-3 off on the H100, 2026-11-25: the matrix unit's
  accumulation does not keep fp32 precision across a 1024-fold bias.)
- the online softmax is base 2 in fp32; one partial (out, lse) per split, merged by
  :func:`merge_splits`, which loops over the splits in blocks (any split count).

With ``DENSE`` the same kernel reads fp16/bf16 K/V tiles instead (the uncompressed baseline
the speed goal compares against: same grid, same softmax, same merge).

Arguments are trusted: :func:`servelab.kernels.turboquant.fused_decode.fused_decode_attention`
validates them before launching; :func:`word_args` turns its ``LaunchConfig`` into this
backend's launch arguments.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
import triton
import triton.language as tl

from servelab.kernels.turboquant.fused_config import LaunchConfig
from servelab.kernels.turboquant.fused_triton_common import sm_count, split_program

VALUE_BIAS = 1024.0
MAX_SPLITS_WORDS = 4096  # the word kernel's merge loops over splits in blocks


@triton.jit  # type: ignore[untyped-decorator]
def decode_split_words_kernel(  # type: ignore[no-untyped-def]
    Q, sqb, sqh,
    K, skb, skh, skt,
    KS, sksb, sksh, skst,
    V, svb, svh, svt,
    VSZ, szb, szh, szt, szc,
    CENT, SEQ_LENS, PART_O, PART_L,
    qk_scale, split_len, num_splits,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, SPLIT: tl.constexpr, PRECISE_TABLE: tl.constexpr,
):  # fmt: skip
    W: tl.constexpr = D // 8
    pid_h, pid_s, pid_b, hq, start, end, qh, mask_g = split_program(
        SEQ_LENS, split_len, GROUP, G_PAD
    )
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + pid_b * sqb + qh[:, None] * sqh + offs_d[None, :], mask=mask_g[:, None], other=0.0
    )
    # Unscaled, so small coordinates keep their fp16 precision; the scale goes on the scores.
    if DENSE:  # noqa: SIM108 (constexpr branches compile to one side)
        qd = q.to(K.dtype.element_ty)
    else:
        qd = q.to(tl.float16)
    # SPLIT: q and p·scale go to the matrix unit as two fp16 terms, hi + lo·2⁻¹¹ (one more
    # MMA each on operands already converted), so their fp16 rounding (2⁻¹² relative) stays
    # out of the result; without it sharp attention over large values drifts past 1e-3.
    q_lo = ((q.to(tl.float32) - qd.to(tl.float32)) * 2048.0).to(tl.float16)
    offs_w = tl.arange(0, W)
    shifts = 4 * tl.arange(0, 8)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    z_i = tl.zeros([G_PAD], tl.float32)  # Σ p·zero
    acc = tl.zeros([G_PAD, D], tl.float32)
    acc_lo = tl.zeros([G_PAD, D], tl.float32)
    k_base = K + pid_b.to(tl.int64) * skb + pid_h.to(tl.int64) * skh
    v_base = V + pid_b.to(tl.int64) * svb + pid_h.to(tl.int64) * svh
    ks_base = KS + pid_b.to(tl.int64) * sksb + pid_h.to(tl.int64) * sksh
    vsz_base = VSZ + pid_b.to(tl.int64) * szb + pid_h.to(tl.int64) * szh

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        rows = offs_n.to(tl.int64)[:, None]
        if DENSE:
            kt = tl.load(k_base + rows * skt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            s = tl.dot(qd, tl.trans(kt)) * qk_scale
        else:
            kw = tl.load(k_base + rows * skt + offs_w[None, :], mask=mask_n[:, None], other=0)
            codes = (kw[:, :, None] >> shifts[None, None, :]) & 15
            kt = tl.reshape(tl.load(CENT + codes), (BLOCK_N, D))
            s = tl.dot(qd, tl.trans(kt))
            if SPLIT:
                s += tl.dot(q_lo, tl.trans(kt)) * (1.0 / 2048.0)
            if PRECISE_TABLE:  # the table's fp16 rounding residue: one more gather and MMA
                kr = tl.reshape(tl.load(CENT + 16 + codes), (BLOCK_N, D))
                s += tl.dot(qd, tl.trans(kr))
            ks = tl.load(ks_base + offs_n * skst, mask=mask_n, other=0.0).to(tl.float32)
            s = s * (ks * qk_scale)[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile holds at least one token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DENSE:
            vt = tl.load(v_base + rows * svt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        else:
            vsc = tl.load(vsz_base + offs_n * szt, mask=mask_n, other=0.0).to(tl.float32)
            vzr = tl.load(vsz_base + offs_n * szt + szc, mask=mask_n, other=0.0).to(tl.float32)
            z_i = z_i * alpha + tl.sum(p * vzr[None, :], 1)
            pv = p * vsc[None, :]
            r = pv.to(tl.float16)
            vw = tl.load(v_base + rows * svt + offs_w[None, :], mask=mask_n[:, None], other=0)
            vbits = ((vw[:, :, None] >> shifts[None, None, :]) & 15) | 0x6400
            # 0x6400 | n is 1024 + n in fp16; subtracting 1024 in fp16 is exact.
            vt = tl.reshape(vbits.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0, (BLOCK_N, D))
            acc = acc * alpha[:, None] + tl.dot(r, vt)
            if SPLIT:
                r_lo = ((pv - r.to(tl.float32)) * 2048.0).to(tl.float16)
                acc_lo = acc_lo * alpha[:, None] + tl.dot(r_lo, vt)
        m_i = m_new

    has = l_i > 0.0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    out = acc * inv[:, None]
    if not DENSE:
        out += (z_i * inv)[:, None]
        if SPLIT:
            out += acc_lo * (inv * (1.0 / 2048.0))[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (pid_b * hq + qh) * num_splits + pid_s
    tl.store(PART_O + row[:, None] * D + offs_d[None, :], out, mask=mask_g[:, None])
    tl.store(PART_L + row, lse, mask=mask_g)


@triton.jit  # type: ignore[untyped-decorator]
def merge_splits_kernel(  # type: ignore[no-untyped-def]
    PART_O, PART_L, OUT, sob, soh, sod, hq, num_splits,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (query row, slice of BLOCK_D columns): with hundreds of splits a
    # program per row alone left most SMs idle and the merge became the long pole.
    pid = tl.program_id(0)  # b * hq + h
    b = pid // hq
    h = pid % hq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    base = pid.to(tl.int64) * num_splits
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    for s0 in range(0, num_splits, BLOCK_S):
        ss = s0 + offs_s
        lse = tl.load(PART_L + base + ss, mask=ss < num_splits, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse, 0))
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    for s0 in range(0, num_splits, BLOCK_S):
        ss = s0 + offs_s
        mask_s = ss < num_splits
        lse = tl.load(PART_L + base + ss, mask=mask_s, other=float("-inf"))
        w = tl.exp2(lse - m)
        o = tl.load(PART_O + (base + ss)[:, None] * D + offs_d[None, :], mask=mask_s[:, None],
                    other=0.0)  # fmt: skip
        acc += tl.sum(w[:, None] * o, 0)
        den += tl.sum(w, 0)
    tl.store(OUT + b * sob + h * soh + offs_d * sod, (acc / den).to(OUT.dtype.element_ty))


def split_plan(tokens: int, block_n: int, num_splits: int) -> tuple[int, int]:
    """``(split_len, splits)``: whole tiles per split, no empty split."""
    splits = max(1, min(num_splits, math.ceil(tokens / block_n)))
    split_len = math.ceil(math.ceil(tokens / splits) / block_n) * block_n
    return split_len, math.ceil(tokens / split_len)


def launch_words(
    q: torch.Tensor,
    k: torch.Tensor,
    ks: torch.Tensor | None,
    v: torch.Tensor,
    vsz: torch.Tensor | None,
    cent: torch.Tensor | None,
    seq_lens: torch.Tensor,
    qk_scale: float,
    out: torch.Tensor,
    tokens: int,
    *,
    block_n: int,
    num_warps: int,
    num_stages: int,
    num_splits: int,
    split_operands: bool = True,
    precise_table: bool = False,
) -> torch.Tensor:
    """Enqueue the split kernel and the merge. Compressed: ``k``/``v`` are the code planes
    viewed as int32 ``[B, Hkv, T, d/8]``; dense: fp16/bf16 ``[B, Hkv, T, d]`` with ``ks``,
    ``vsz`` and ``cent`` None. ``q`` is ``[B, Hq, d]`` (rotated for the compressed cache)."""
    b, hq, d = (int(s) for s in q.shape)
    hkv = int(k.shape[1])
    group = hq // hkv
    dense = ks is None
    split_len, splits = split_plan(tokens, block_n, num_splits)
    part_o = torch.empty((b * hq * splits, d), dtype=torch.float32, device=q.device)
    part_l = torch.empty((b * hq * splits,), dtype=torch.float32, device=q.device)
    ks_t = k if ks is None else ks
    vsz_t = v if vsz is None else vsz
    ks_strides = (0, 0, 0) if ks is None else tuple(ks.stride()[:3])
    vsz_strides = (0, 0, 0, 0) if vsz is None else tuple(vsz.stride()[:4])
    grid = (hkv, splits, b)
    decode_split_words_kernel[grid](
        q, q.stride(0), q.stride(1),
        k, k.stride(0), k.stride(1), k.stride(2),
        ks_t, *ks_strides,
        v, v.stride(0), v.stride(1), v.stride(2),
        vsz_t, *vsz_strides,
        k if cent is None else cent, seq_lens, part_o, part_l,
        qk_scale, split_len, splits,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block_n,
        DENSE=dense, SPLIT=split_operands and not dense,
        PRECISE_TABLE=precise_table and not dense,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return merge_splits(part_o, part_l, out, splits)


def merge_splits(
    part_o: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor, splits: int
) -> torch.Tensor:
    """Enqueue the merge of per-split partials (base-2 LSE, rows ordered (b, h, split)) into
    ``out [B, Hq, d]``; shared by every split-KV decode kernel of this package."""
    b, hq, d = (int(x) for x in out.shape)
    block_d = min(d, 32)
    merge_splits_kernel[(b * hq, d // block_d)](
        part_o, part_l, out, *out.stride(), hq, splits,
        D=d, BLOCK_S=min(64, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """A uint8 code plane [B, H, T, d/2] as int32 words [B, H, T, d/8] (no copy when the
    rows are contiguous and 4-byte aligned; a contiguous copy otherwise)."""
    ok = codes.stride(-1) == 1 and all(s % 4 == 0 for s in codes.stride()[:-1])
    if not ok or codes.storage_offset() % 4:
        codes = codes.contiguous()
    return codes.view(torch.int32)


class WordArgs(TypedDict):
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int
    split_operands: bool
    precise_table: bool


def word_args(cfg: LaunchConfig, device: torch.device, b: int, hkv: int, tokens: int) -> WordArgs:
    """:func:`launch_words`' keyword arguments for ``cfg`` (``tokens`` is unused)."""
    splits = cfg.num_splits
    if splits is None:  # about eight programs per multiprocessor
        splits = math.ceil(8 * sm_count(device) / (b * hkv))
    return {
        "block_n": cfg.block_n,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "num_splits": max(1, min(splits, MAX_SPLITS_WORDS)),
        "split_operands": cfg.split_operands,
        "precise_table": cfg.precise_table,
    }
