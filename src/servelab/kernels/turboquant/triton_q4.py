"""The split-KV decode kernel specialised for 4-bit Lloyd–Max keys and 4-bit uniform values.

The generic kernel (triton_decode) unpacks codes to a [BLOCK_N, d] tile, interleaves the two
nibbles and looks every code up in the centroid table: about one gather and a register
shuffle per element, which made it compute-bound at a tenth of the memory bandwidth (H100,
2026-11-25). This one never interleaves and never converts integers:

- each packed byte holds coordinates 2j (low nibble) and 2j + 1 (high nibble), so the even and
  odd halves of q, K and V are kept as separate [.., d/2] tiles and the dot products are split
  in two: ⟨q, k⟩ = ⟨q_even, k_even⟩ + ⟨q_odd, k_odd⟩, and the output halves are stored to the
  even and odd columns at the end;
- keys: one gather per byte from a 256-entry table of fp16 centroid pairs packed in an int32;
- values: the 4-bit code n, as fp16 bits, is the subnormal n·2⁻²⁴, exact, so the code goes to
  the matrix unit with one AND and the 2²⁴ is applied once at the end, in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from servelab.kernels.turboquant.triton_common import split_program

SUBNORMAL_UNIT = 2.0**-24


@triton.jit
def _pair_halves(word):  # type: ignore[no-untyped-def]
    lo = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit  # type: ignore[untyped-decorator]
def decode_split_q4_kernel(  # type: ignore[no-untyped-def]
    Q, sqb, sqh, sqd,
    K, skb, skh, skt, skd,
    KS, sksb, sksh, skst,
    V, svb, svh, svt, svd,
    VSZ, szb, szh, szt, szc,
    KTAB, CENT, SEQ_LENS, PART_O, PART_L,
    qk_scale, split_len,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISE_TABLE: tl.constexpr, PAIR_TABLE: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = D // 2
    pid_h, pid_s, pid_b, hq, start, end, qh, mask_g = split_program(
        SEQ_LENS, split_len, GROUP, G_PAD
    )
    offs_h = tl.arange(0, HALF)
    q_rows = Q + pid_b * sqb + qh[:, None] * sqh
    q_e = tl.load(q_rows + (2 * offs_h)[None, :] * sqd, mask=mask_g[:, None], other=0.0)
    q_o = tl.load(q_rows + (2 * offs_h + 1)[None, :] * sqd, mask=mask_g[:, None], other=0.0)
    q_e = q_e.to(tl.float32) * qk_scale
    q_o = q_o.to(tl.float32) * qk_scale
    qe_hi = q_e.to(tl.float16)
    qo_hi = q_o.to(tl.float16)
    qe_lo = (q_e - qe_hi.to(tl.float32)).to(tl.float16)
    qo_lo = (q_o - qo_hi.to(tl.float32)).to(tl.float16)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    z_i = tl.zeros([G_PAD], tl.float32)  # Σ p·zero
    acc_e = tl.zeros([G_PAD, HALF], tl.float32)
    acc_o = tl.zeros([G_PAD, HALF], tl.float32)
    # The lo half of p·scale goes in scaled by 2^11: the matrix unit drops products of two
    # fp16 subnormals (seen on H100), and the value codes are subnormals.
    acc_el = tl.zeros([G_PAD, HALF], tl.float32)
    acc_ol = tl.zeros([G_PAD, HALF], tl.float32)
    k_base = K + pid_b.to(tl.int64) * skb + pid_h.to(tl.int64) * skh
    v_base = V + pid_b.to(tl.int64) * svb + pid_h.to(tl.int64) * svh
    ks_base = KS + pid_b.to(tl.int64) * sksb + pid_h.to(tl.int64) * sksh
    vsz_base = VSZ + pid_b.to(tl.int64) * szb + pid_h.to(tl.int64) * szh

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        offs_n64 = offs_n.to(tl.int64)
        kb = tl.load(
            k_base + offs_n64[:, None] * skt + offs_h[None, :] * skd, mask=mask_n[:, None], other=0
        ).to(tl.int32)
        vb = tl.load(
            v_base + offs_n64[:, None] * svt + offs_h[None, :] * svd, mask=mask_n[:, None], other=0
        ).to(tl.int32)
        ks = tl.load(ks_base + offs_n64 * skst, mask=mask_n, other=0.0).to(tl.float32)
        vsc = tl.load(vsz_base + offs_n64 * szt, mask=mask_n, other=0.0).to(tl.float32)
        vzr = tl.load(vsz_base + offs_n64 * szt + szc, mask=mask_n, other=0.0).to(tl.float32)

        if PAIR_TABLE:  # one gather per byte, from a 1 KB table (8 cache lines)
            k_e, k_o = _pair_halves(tl.load(KTAB + kb))
        else:  # one gather per nibble, from a 32-byte table (one sector)
            k_e = tl.load(CENT + (kb & 15))
            k_o = tl.load(CENT + (kb >> 4))
        s = tl.dot(qe_hi, tl.trans(k_e))
        s = tl.dot(qo_hi, tl.trans(k_o), acc=s)
        if SPLIT:
            s = tl.dot(qe_lo, tl.trans(k_e), acc=s)
            s = tl.dot(qo_lo, tl.trans(k_o), acc=s)
        if PRECISE_TABLE:
            if PAIR_TABLE:
                r_e, r_o = _pair_halves(tl.load(KTAB + 256 + kb))
            else:
                r_e = tl.load(CENT + 16 + (kb & 15))
                r_o = tl.load(CENT + 16 + (kb >> 4))
            s = tl.dot(qe_hi, tl.trans(r_e), acc=s)
            s = tl.dot(qo_hi, tl.trans(r_o), acc=s)
        s = s * ks[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        z_i = z_i * alpha + tl.sum(p * vzr[None, :], 1)
        acc_e = acc_e * alpha[:, None]
        acc_o = acc_o * alpha[:, None]

        v_e = (vb & 15).to(tl.int16).to(tl.float16, bitcast=True)
        v_o = (vb >> 4).to(tl.int16).to(tl.float16, bitcast=True)
        pv = p * vsc[None, :]
        pv_hi = pv.to(tl.float16)
        pv_lo = ((pv - pv_hi.to(tl.float32)) * 2048.0).to(tl.float16)
        acc_e = tl.dot(pv_hi, v_e, acc=acc_e)
        acc_o = tl.dot(pv_hi, v_o, acc=acc_o)
        if SPLIT:
            acc_el = tl.dot(pv_lo, v_e, acc=acc_el * alpha[:, None])
            acc_ol = tl.dot(pv_lo, v_o, acc=acc_ol * alpha[:, None])
        m_i = m_new

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    row = (pid_b * hq + qh) * NUM_SPLITS + pid_s
    inv = 1.0 / l_safe
    zero = (z_i * inv)[:, None]
    out_rows = PART_O + row[:, None] * D
    acc_e = acc_e + acc_el * (1.0 / 2048.0)
    acc_o = acc_o + acc_ol * (1.0 / 2048.0)
    tl.store(
        out_rows + (2 * offs_h)[None, :],
        acc_e * (inv * 16777216.0)[:, None] + zero,
        mask=mask_g[:, None],
    )
    tl.store(
        out_rows + (2 * offs_h + 1)[None, :],
        acc_o * (inv * 16777216.0)[:, None] + zero,
        mask=mask_g[:, None],
    )
    tl.store(PART_L + row, lse, mask=mask_g)
