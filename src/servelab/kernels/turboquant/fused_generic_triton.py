"""The generic fused decode backend (Triton): split-KV decode attention reading any preset's
packed TurboQuant cache, or fp16/bf16 K/V, directly.

One program per (KV head, split, sequence) walks its slice of the sequence in tiles of
BLOCK_N tokens, serving all Hq/Hkv query heads of that KV head from one read of the tile:

- keys: unpack b-bit indices, look the √d-scaled centroids up in a 2^b-entry table, and
  score against the query rotated once on the host side (⟨Πq, c_idx⟩ = ⟨q, Πᵀc_idx⟩), times the
  stored per-key scale; FP8 keys are read as is; dense keys (fp16/bf16) are read as is;
- values: Σ p·(idx·scale + zero) = (p·scale)·idx + Σ p·zero, so the uniform codes go to the
  matrix unit as small integers and the zero point costs one row sum;
- an online softmax in base 2 per split, then a second kernel merges the splits by their
  log-sum-exp (`fused_words_triton.merge_splits`, shared). For partials (o_j, lse_j) in
  base 2: M = max_j lse_j, lse = M + log2 Σ_j 2^(lse_j − M), o = Σ_j 2^(lse_j − lse)·o_j
  (the merge of the FlashInfer paper, arXiv 2501.01005 §2.2, and of vLLM's
  merge_attn_states, there in natural log).

``turboquant_4bit_nc`` and the dense baseline go to the word backends instead unless
``LaunchConfig.generic``. Arguments are trusted: ``fused_decode`` checks them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from servelab.kernels.turboquant.fused_config import LaunchConfig
from servelab.kernels.turboquant.fused_triton_common import sm_count, split_program
from servelab.kernels.turboquant.fused_words_triton import merge_splits, split_plan

KMODE_DENSE, KMODE_FP8, KMODE_CODEBOOK = 0, 1, 2
VMODE_DENSE, VMODE_UNIFORM = 0, 2
MAX_SPLITS = 256


@triton.jit  # type: ignore[untyped-decorator]
def _unpack_codes(  # type: ignore[no-untyped-def]
    ptr, row_off, mask_n, stride_byte, BITS: tl.constexpr, D: tl.constexpr, NBYTES: tl.constexpr
):
    """int32 codes [BLOCK_N, D] of the rows at ptr + row_off (layout of packing.py)."""
    if BITS == 4:
        offs_b = tl.arange(0, D // 2)
        raw = tl.load(
            ptr + row_off[:, None] + offs_b[None, :] * stride_byte, mask=mask_n[:, None], other=0
        ).to(tl.int32)
        codes = tl.interleave(raw & 15, raw >> 4)
    elif BITS == 8:
        offs_d = tl.arange(0, D)
        codes = tl.load(
            ptr + row_off[:, None] + offs_d[None, :] * stride_byte, mask=mask_n[:, None], other=0
        ).to(tl.int32)
    else:
        offs_d = tl.arange(0, D)
        bit = offs_d * BITS
        byte = bit >> 3
        nxt = byte + 1
        b0 = tl.load(
            ptr + row_off[:, None] + byte[None, :] * stride_byte, mask=mask_n[:, None], other=0
        ).to(tl.int32)
        b1 = tl.load(
            ptr + row_off[:, None] + nxt[None, :] * stride_byte,
            mask=mask_n[:, None] & (nxt < NBYTES)[None, :],
            other=0,
        ).to(tl.int32)
        codes = ((b0 | (b1 << 8)) >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
    return codes


@triton.jit  # type: ignore[untyped-decorator]
def _decode_split_kernel(  # type: ignore[no-untyped-def]
    Q,
    sqb,
    sqh,
    sqd,
    K,
    skb,
    skh,
    skt,
    skd,
    KS,
    sksb,
    sksh,
    skst,
    V,
    svb,
    svh,
    svt,
    svd,
    VSZ,
    szb,
    szh,
    szt,
    szc,
    CENT,
    SEQ_LENS,
    PART_O,
    PART_L,
    qk_scale,
    split_len,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KMODE: tl.constexpr,
    KBITS: tl.constexpr,
    KBYTES: tl.constexpr,
    VMODE: tl.constexpr,
    VBITS: tl.constexpr,
    VBYTES: tl.constexpr,
    PRECISE_TABLE: tl.constexpr,
):
    pid_h, pid_s, pid_b, hq, start, end, qh, mask_g = split_program(
        SEQ_LENS, split_len, GROUP, G_PAD
    )
    offs_d = tl.arange(0, D)
    q = (
        tl.load(
            Q + pid_b * sqb + qh[:, None] * sqh + offs_d[None, :] * sqd,
            mask=mask_g[:, None],
            other=0.0,
        ).to(tl.float32)
        * qk_scale
    )
    if KMODE == 0:
        q_hi = q.to(K.dtype.element_ty)
        q_lo = q_hi  # unused: the dense baseline rounds q to its K dtype, as SDPA does
    else:
        # Keys are exact in fp16 (centroids, fp8); split q into two fp16 terms so that its
        # rounding (≈ 5e-4 relative, amplified by large logits) does not set the error.
        q_hi = q.to(tl.float16)
        q_lo = (q - q_hi.to(tl.float32)).to(tl.float16)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = K + pid_b.to(tl.int64) * skb + pid_h.to(tl.int64) * skh
    v_base = V + pid_b.to(tl.int64) * svb + pid_h.to(tl.int64) * svh
    ks_base = KS + pid_b.to(tl.int64) * sksb + pid_h.to(tl.int64) * sksh
    vsz_base = VSZ + pid_b.to(tl.int64) * szb + pid_h.to(tl.int64) * szh

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        offs_n64 = offs_n.to(tl.int64)
        if KMODE == 0:
            k = tl.load(
                k_base + offs_n64[:, None] * skt + offs_d[None, :] * skd,
                mask=mask_n[:, None],
                other=0.0,
            )
        elif KMODE == 1:
            k = tl.load(
                k_base + offs_n64[:, None] * skt + offs_d[None, :] * skd,
                mask=mask_n[:, None],
                other=0,
            )
            k = k.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            kidx = _unpack_codes(k_base, offs_n64 * skt, mask_n, skd, KBITS, D, KBYTES)
            k = tl.load(CENT + kidx)
        if KMODE == 0:
            s = tl.dot(q_hi, tl.trans(k))
        else:
            s = tl.dot(q_lo, tl.trans(k), acc=tl.dot(q_hi, tl.trans(k)))
            if KMODE == 2 and PRECISE_TABLE:
                # The table's fp16 rounding residue, a second table of 2^b entries.
                k_lo = tl.load(CENT + (1 << KBITS) + kidx)
                s = tl.dot(q_hi, tl.trans(k_lo), acc=s)
        if KMODE == 2:
            ks = tl.load(ks_base + offs_n64 * skst, mask=mask_n, other=0.0).to(tl.float32)
            s = s * ks[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if VMODE == 0:
            v = tl.load(
                v_base + offs_n64[:, None] * svt + offs_d[None, :] * svd,
                mask=mask_n[:, None],
                other=0.0,
            )
            acc += tl.dot(p.to(v.dtype), v)
        else:
            vidx = _unpack_codes(v_base, offs_n64 * svt, mask_n, svd, VBITS, D, VBYTES)
            vsc = tl.load(vsz_base + offs_n64 * szt, mask=mask_n, other=0.0).to(tl.float32)
            vzr = tl.load(vsz_base + offs_n64 * szt + szc, mask=mask_n, other=0.0).to(tl.float32)
            # Codes are exact in fp16; p·scale is split in two fp16 terms (peaked attention
            # would otherwise carry fp16's 2.4e-4 relative rounding straight to the output).
            pv = p * vsc[None, :]
            pv_hi = pv.to(tl.float16)
            pv_lo = (pv - pv_hi.to(tl.float32)).to(tl.float16)
            vf = vidx.to(tl.float16)
            acc = tl.dot(pv_lo, vf, acc=tl.dot(pv_hi, vf, acc=acc))
            acc += tl.sum(p * vzr[None, :], 1)[:, None]
        m_i = m_new

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    row = (pid_b * hq + qh) * NUM_SPLITS + pid_s
    tl.store(
        PART_O + row[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=mask_g[:, None]
    )
    tl.store(PART_L + row, lse, mask=mask_g)


def launch_generic(
    q: torch.Tensor,
    kmode: int,
    kbits: int,
    kbytes: int,
    k: torch.Tensor,
    ks: torch.Tensor | None,
    vmode: int,
    vbits: int,
    vbytes: int,
    v: torch.Tensor,
    vsz: torch.Tensor | None,
    cent: torch.Tensor | None,
    seq_lens: torch.Tensor,
    qk_scale: float,
    out: torch.Tensor,
    tokens: int,
    hkv: int,
    cfg: LaunchConfig,
) -> torch.Tensor:
    """Enqueue the generic split kernel and the merge (arguments already checked)."""
    b, hq, d = (int(s) for s in q.shape)
    group = hq // hkv
    splits = cfg.num_splits
    if splits is None:
        splits = math.ceil(4 * sm_count(q.device) / (b * hkv))
    split_len, splits = split_plan(tokens, cfg.block_n, min(splits, MAX_SPLITS))
    part_o = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    part_l = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    ks_t = ks if ks is not None else k
    vsz_t = vsz if vsz is not None else v
    ks_strides = ks.stride()[:3] if ks is not None else (0, 0, 0)
    vsz_strides = vsz.stride()[:4] if vsz is not None else (0, 0, 0, 0)
    grid = (hkv, splits, b)
    _decode_split_kernel[grid](
        q,
        *q.stride(),
        k,
        *k.stride(),
        ks_t,
        *ks_strides,
        v,
        *v.stride(),
        vsz_t,
        *vsz_strides,
        cent if cent is not None else k,
        seq_lens,
        part_o,
        part_l,
        qk_scale,
        split_len,
        NUM_SPLITS=splits,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK_N=cfg.block_n,
        KMODE=kmode,
        KBITS=kbits,
        KBYTES=kbytes,
        VMODE=vmode,
        VBITS=vbits,
        VBYTES=vbytes,
        PRECISE_TABLE=cfg.precise_table,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return merge_splits(part_o, part_l, out, splits)
