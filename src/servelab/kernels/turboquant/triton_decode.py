"""Fused split-KV decode attention (Triton) reading the packed TurboQuant cache directly.

One program per (KV head, split, sequence) walks its slice of the sequence in tiles of
BLOCK_N tokens, serving all Hq/Hkv query heads of that KV head from one read of the tile:

- keys: unpack b-bit indices, look the √d-scaled centroids up in a 2^b-entry table, and
  score against the query rotated once on the host side (⟨Πq, c_idx⟩ = ⟨q, Πᵀc_idx⟩), times the
  stored per-key scale; FP8 keys are read as is; dense keys (fp16/bf16) are read as is;
- values: Σ p·(idx·scale + zero) = (p·scale)·idx + Σ p·zero, so the uniform codes go to the
  matrix unit as small integers and the zero point costs one row sum;
- an online softmax in base 2 per split, then a second kernel merges the splits by their
  log-sum-exp (reference/kernels.md §1.2; `triton_words.merge_splits`, shared).

This generic kernel serves every preset; `turboquant_4bit_nc` and the dense baseline go to
the word kernel (`triton_words`) unless `LaunchConfig.generic`.

Every shape, dtype and layout is checked on the host before the first launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import torch
import triton
import triton.language as tl

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.attention import check_decode_shapes
from servelab.kernels.turboquant.cuda_words import WARPS, launch_cuda_words, unsupported
from servelab.kernels.turboquant.kvcache import KVCodec, PackedKVCache
from servelab.kernels.turboquant.triton_common import split_program
from servelab.kernels.turboquant.triton_words import launch_words, merge_splits, split_plan

KMODE_DENSE, KMODE_FP8, KMODE_CODEBOOK = 0, 1, 2
VMODE_DENSE, VMODE_UNIFORM = 0, 2
MAX_SPLITS = 256
MAX_SPLITS_WORDS = 4096  # the word kernel's merge loops over splits in blocks
LOG2E = 1.4426950408889634
SUPPORTED_DEVICES = ("cuda", "xpu")
BACKENDS = ("auto", "cuda", "triton")


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


@dataclass(frozen=True, eq=False)
class DecodeConstants:
    """Per-(codec, device) tensors the fused path needs, built once, not per decode step."""

    rotation_t: torch.Tensor | None  # Πᵀ, float32 on the device
    centroids: torch.Tensor | None  # √d·c_k as fp16, then its fp16 rounding residue

    @classmethod
    def build(cls, codec: KVCodec, device: torch.device) -> DecodeConstants:
        if codec.key_quantizer is None:
            return cls(None, None)
        rot = codec.key_quantizer.rotation.matrix.T.to(device=device, dtype=torch.float32)
        table = codec.centroid_table(torch.device("cpu"))
        hi = table.to(torch.float16)
        lo = (table - hi.float()).to(torch.float16)
        return cls(rot.contiguous(), torch.cat((hi, lo)).contiguous().to(device))


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None  # None: about four programs per multiprocessor
    precise_table: bool = True  # add the fp16 residue of the centroid table (one more MMA)
    # The generic kernel where the word kernel (triton_words) would serve: 4-bit keys and
    # values, and the dense baseline.
    generic: bool = False
    split_operands: bool = True  # word kernel: q and p·scale as fp16 hi + lo (2× the MMAs)
    # 4-bit keys and values: "auto" takes the CUDA kernel (csrc/tq4_decode.cu) where it runs
    # and the Triton word kernel elsewhere; "cuda" insists (an error says why it cannot run);
    # "triton" never builds it. Its own knob: warps per CTA (4 or 8); num_splits and
    # precise_table apply to it too.
    backend: str = "auto"
    cuda_warps: int = 16
    # CUDA kernel: programmatic dependent launch on sm_90+ (the next call's CTAs start while
    # this one finishes; each waits for its predecessor before reading anything).
    cuda_pdl: bool = True


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    props = torch.xpu.get_device_properties(device)
    return int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 64))


def _check_device(tensors: list[torch.Tensor], where: str) -> torch.device:
    dev = tensors[0].device
    if dev.type not in SUPPORTED_DEVICES:
        raise KernelInputError(
            f"{where}: the fused kernel runs on CUDA or XPU tensors, got {dev}; use "
            "unfused_decode_attention on this device"
        )
    for t in tensors[1:]:
        if t.device != dev:
            raise KernelInputError(f"{where}: tensors on {dev} and {t.device}; move them together")
    return dev


def _check_out(out: torch.Tensor | None, q: torch.Tensor, where: str) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or not out.is_floating_point() or out.device != q.device:
        raise KernelInputError(
            f"{where}: out must be a floating tensor of shape {tuple(q.shape)} on {q.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def _seq_lens(
    seq_lens: torch.Tensor | None, b: int, t: int, dev: torch.device, check_values: bool, where: str
) -> torch.Tensor:
    return _or_full(_given_lens(seq_lens, b, t, dev, check_values, where), b, t, dev)


def _or_full(given: torch.Tensor | None, b: int, t: int, dev: torch.device) -> torch.Tensor:
    """``given``, or int32 lengths of ``t`` for every sequence."""
    return given if given is not None else torch.full((b,), t, dtype=torch.int32, device=dev)


def _given_lens(
    seq_lens: torch.Tensor | None, b: int, t: int, dev: torch.device, check_values: bool, where: str
) -> torch.Tensor | None:
    """The caller's seq_lens as int32, checked; None when every sequence is full."""
    if seq_lens is None:
        return None
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(
            f"{where}: seq_lens must be int32/int64 of shape ({b},), got {seq_lens.dtype} "
            f"{tuple(seq_lens.shape)}"
        )
    if seq_lens.device != dev:
        raise KernelInputError(f"{where}: seq_lens is on {seq_lens.device}, the cache on {dev}")
    if check_values and bool(((seq_lens < 1) | (seq_lens > t)).any()):
        raise KernelInputError(f"{where}: every seq_lens entry must lie in [1, {t}]")
    return seq_lens.to(torch.int32).contiguous()


def _check_head_size(d: int, where: str) -> None:
    if d < 16 or d & (d - 1):
        raise KernelInputError(
            f"{where}: head size {d} is not supported by the fused kernel (a power of two ≥ 16)"
        )


def _check_backend(cfg: LaunchConfig, where: str) -> None:
    if cfg.backend not in BACKENDS:
        raise KernelInputError(
            f"{where}: LaunchConfig.backend is {cfg.backend!r}; expected one of {BACKENDS}"
        )
    if cfg.cuda_warps not in WARPS:
        raise KernelInputError(
            f"{where}: LaunchConfig.cuda_warps is {cfg.cuda_warps!r}; expected one of {WARPS}"
        )
    if not isinstance(cfg.cuda_pdl, bool):
        raise KernelInputError(
            f"{where}: LaunchConfig.cuda_pdl is {cfg.cuda_pdl!r}; expected True or False"
        )


def _cuda_kernel(
    cfg: LaunchConfig,
    q: torch.Tensor,
    d: int,
    cache: PackedKVCache,
    out: torch.Tensor,
    where: str,
) -> bool:
    """Whether the CUDA kernel takes this call; ``backend="cuda"`` turns a refusal into an
    error naming the reason."""
    if cfg.backend == "triton":
        return False
    reason = unsupported(q, d, cache, out)
    if reason is not None and cfg.backend == "cuda":
        raise KernelInputError(f"{where}: backend='cuda' cannot run here: {reason}")
    return reason is None


def _as_words(codes: torch.Tensor) -> torch.Tensor:
    """A uint8 code plane [B, H, T, d/2] as int32 words [B, H, T, d/8] (no copy when the
    rows are contiguous and 4-byte aligned; a contiguous copy otherwise)."""
    ok = codes.stride(-1) == 1 and all(s % 4 == 0 for s in codes.stride()[:-1])
    if not ok or codes.storage_offset() % 4:
        codes = codes.contiguous()
    return codes.view(torch.int32)


class _WordArgs(TypedDict):
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int
    split_operands: bool
    precise_table: bool


def _word_args(cfg: LaunchConfig, device: torch.device, b: int, hkv: int, tokens: int) -> _WordArgs:
    splits = cfg.num_splits
    if splits is None:  # about eight programs per multiprocessor
        splits = math.ceil(8 * _sm_count(device) / (b * hkv))
    return {
        "block_n": cfg.block_n,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "num_splits": max(1, min(splits, MAX_SPLITS_WORDS)),
        "split_operands": cfg.split_operands,
        "precise_table": cfg.precise_table,
    }


def _launch(
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
    b, hq, d = (int(s) for s in q.shape)
    group = hq // hkv
    splits = cfg.num_splits
    if splits is None:
        splits = math.ceil(4 * _sm_count(q.device) / (b * hkv))
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


def fused_decode_attention(
    q: torch.Tensor,
    cache: PackedKVCache,
    codec: KVCodec,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    constants: DecodeConstants | None = None,
    config: LaunchConfig = LaunchConfig(),
    check_values: bool = True,
) -> torch.Tensor:
    """softmax(scale·q·k̃ᵀ)·ṽ over the packed cache; q [B, Hq, d] → out [B, Hq, d].

    ``check_values`` scans q and seq_lens for bad values (a device sync); a decode loop that
    has validated them upstream passes False.
    """
    where = "fused_decode_attention"
    b, _, hkv, t, d = check_decode_shapes(q, tuple(cache.key_codes.shape), cache.head_size, where)
    codec.check_cache(cache, where)
    _check_backend(config, where)
    _check_head_size(d, where)
    dev = _check_device([q, *cache.planes()], where)
    out = _check_out(out, q, where)
    given = _given_lens(seq_lens, b, t, dev, check_values, where)
    if check_values and not bool(torch.isfinite(q).all()):
        raise KernelInputError(f"{where}: q holds NaN or infinite values")
    consts = constants if constants is not None else DecodeConstants.build(codec, dev)
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    p = codec.preset
    word_kernel = p.key_format == "lloyd_max" and p.key_bits == 4 and p.value_bits == 4
    if p.key_format == "fp8":
        qk, kmode, kbits, cent = q, KMODE_FP8, 8, None
        qk_scale = sm * LOG2E
    else:
        if consts.rotation_t is None or consts.centroids is None:
            raise KernelInputError(f"{where}: constants were built for a codec without codebook")
        rot = consts.rotation_t.to(dev)
        kmode, kbits, cent = KMODE_CODEBOOK, p.key_bits, consts.centroids
        qk_scale = sm * LOG2E / math.sqrt(d)
        if word_kernel and not config.generic and _cuda_kernel(config, q, d, cache, out, where):
            return launch_cuda_words(
                q,
                rot,
                cache,
                consts.centroids,
                given,
                qk_scale,
                out,
                warps=config.cuda_warps,
                num_splits=config.num_splits,
                precise=config.precise_table,
                pdl=config.cuda_pdl,
            )
        qk = q.float() @ rot  # Πq for each head, once per step
    lens = _or_full(given, b, t, dev)
    if word_kernel and not config.generic and cache.key_scales is not None:
        return launch_words(
            qk.contiguous(),
            _as_words(cache.key_codes),
            cache.key_scales,
            _as_words(cache.value_codes),
            cache.value_scale_zero,
            cent,
            lens,
            qk_scale,
            out,
            t,
            **_word_args(config, q.device, b, hkv, t),
        )
    return _launch(
        qk,
        kmode,
        kbits,
        p.key_code_bytes(d),
        cache.key_codes,
        cache.key_scales,
        VMODE_UNIFORM,
        p.value_bits,
        p.value_code_bytes(d),
        cache.value_codes,
        cache.value_scale_zero,
        cent,
        lens,
        qk_scale,
        out,
        t,
        hkv,
        config,
    )


def fused_decode_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig = LaunchConfig(),
    check_values: bool = True,
) -> torch.Tensor:
    """The same kernel reading fp16/bf16 K/V [B, Hkv, T, d] (the uncompressed baseline)."""
    where = "fused_decode_attention_dense"
    if k.shape != v.shape or k.dtype != v.dtype or k.ndim != 4:
        raise KernelInputError(
            f"{where}: k and v must be 4-D of one shape and dtype, got {k.dtype} "
            f"{tuple(k.shape)} and {v.dtype} {tuple(v.shape)}"
        )
    if k.dtype not in (torch.float16, torch.bfloat16):
        raise KernelInputError(f"{where}: dense K/V must be float16 or bfloat16, got {k.dtype}")
    b, _, hkv, t, d = check_decode_shapes(q, tuple(k.shape), int(k.shape[-1]), where)
    _check_head_size(d, where)
    dev = _check_device([q, k, v], where)
    out = _check_out(out, q, where)
    lens = _seq_lens(seq_lens, b, t, dev, check_values, where)
    if check_values and not bool(torch.isfinite(q).all()):
        raise KernelInputError(f"{where}: q holds NaN or infinite values")
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    if not config.generic and k.stride(-1) == 1 and v.stride(-1) == 1:
        return launch_words(
            q.contiguous(), k, None, v, None, None, lens, sm * LOG2E, out, t,
            **_word_args(config, q.device, b, hkv, t),
        )  # fmt: skip
    return _launch(
        q,
        KMODE_DENSE,
        16,
        2 * d,
        k,
        None,
        VMODE_DENSE,
        16,
        2 * d,
        v,
        None,
        None,
        lens,
        sm * LOG2E,
        out,
        t,
        hkv,
        config,
    )
