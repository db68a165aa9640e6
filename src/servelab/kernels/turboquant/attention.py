"""Decode attention over K/V: the float64 reference and the unfused compressed path.

Shapes: q [B, Hq, d], k and v [B, Hkv, T, d], Hq a multiple of Hkv (query head h reads KV
head h // (Hq/Hkv)), optional seq_lens [B] (tokens ≥ seq_lens[b] are ignored).
"""

from __future__ import annotations

import math

import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.kvcache import KVCodec, PackedKVCache


def check_decode_shapes(
    q: torch.Tensor, kv_shape: tuple[int, ...], head_size: int, where: str
) -> tuple[int, int, int, int, int]:
    """Return (B, Hq, Hkv, T, d) after checking q against the cache shape [B, Hkv, T, ...]."""
    if not isinstance(q, torch.Tensor) or not q.is_floating_point() or q.ndim != 3:
        raise KernelInputError(
            f"{where}: q must be a floating 3-D tensor [batch, q_heads, head_size], got "
            f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}"
        )
    b, hq, d = (int(s) for s in q.shape)
    if len(kv_shape) < 3:
        raise KernelInputError(
            f"{where}: K/V shape {kv_shape} is not [batch, kv_heads, tokens, ...]"
        )
    kb, hkv, t = (int(s) for s in kv_shape[:3])
    if d != head_size:
        raise KernelInputError(f"{where}: q head size {d} differs from the cache's {head_size}")
    if kb != b:
        raise KernelInputError(f"{where}: q batch {b} differs from the cache batch {kb}")
    if hkv == 0 or hq % hkv != 0:
        raise KernelInputError(
            f"{where}: {hq} query heads are not a multiple of {hkv} KV heads (GQA needs one)"
        )
    if t == 0:
        raise KernelInputError(f"{where}: the cache holds no tokens")
    return b, hq, hkv, t, d


def _length_mask(
    seq_lens: torch.Tensor | None, b: int, t: int, device: torch.device, where: str
) -> torch.Tensor:
    if seq_lens is None:
        return torch.ones((b, t), dtype=torch.bool, device=device)
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(
            f"{where}: seq_lens must be an int32/int64 tensor of shape ({b},), got "
            f"{seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    lens = seq_lens.to(device=device, dtype=torch.int64)
    if bool(((lens < 1) | (lens > t)).any()):
        raise KernelInputError(f"{where}: every seq_lens entry must lie in [1, {t}]")
    return torch.arange(t, device=device).unsqueeze(0) < lens.unsqueeze(1)


def reference_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale·q·kᵀ)·v in float64 on the inputs' device; returns float64 [B, Hq, d]."""
    where = "reference_decode_attention"
    if k.shape != v.shape:
        raise KernelInputError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    b, hq, hkv, t, d = check_decode_shapes(q, tuple(k.shape), int(k.shape[-1]), where)
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    g = hq // hkv
    qq = q.to(torch.float64).reshape(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhtd->bhgt", qq, k.to(torch.float64)) * sm
    mask = _length_mask(seq_lens, b, t, q.device, where)
    logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    p = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgt,bhtd->bhgd", p, v.to(torch.float64))
    return out.reshape(b, hq, d)


def unfused_decode_attention(
    q: torch.Tensor,
    cache: PackedKVCache,
    codec: KVCodec,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize the whole cache, then the float64 reference (the fused kernel's oracle)."""
    check_decode_shapes(
        q, tuple(cache.key_codes.shape), cache.head_size, "unfused_decode_attention"
    )
    k, v = codec.decode(cache, torch.float32)
    return reference_decode_attention(q, k, v, scale, seq_lens)


def predict_key_drift(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_distortion: float,
    scale: float | None = None,
) -> torch.Tensor:
    """First-order RMS output error [B, Hq] that key quantization alone should cause.

    A key error of relative energy D moves logit t by ε_t with std
    σ_t = scale·‖q‖·‖k_t‖·√(D/d) (error direction isotropic after the rotation); then
    δo ≈ Σ_t p_t·ε_t·(v_t − o), so E‖δo‖² ≈ Σ_t p_t²·σ_t²·‖v_t − o‖². Valid while σ_t ≪ 1.
    """
    b, hq, hkv, _, d = check_decode_shapes(q, tuple(k.shape), int(k.shape[-1]), "predict_key_drift")
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    g = hq // hkv
    qq = q.to(torch.float64).reshape(b, hkv, g, d)
    kk, vv = k.to(torch.float64), v.to(torch.float64)
    p = torch.softmax(torch.einsum("bhgd,bhtd->bhgt", qq, kk) * sm, dim=-1)
    o = torch.einsum("bhgt,bhtd->bhgd", p, vv)
    sigma = (
        sm
        * math.sqrt(key_distortion / d)
        * torch.linalg.vector_norm(qq, dim=-1)[..., None]
        * torch.linalg.vector_norm(kk, dim=-1)[:, :, None, :]
    )
    # ‖v_t − o‖² expanded, so no [.., T, d] intermediate is built
    spread = (
        (vv * vv).sum(-1)[:, :, None, :]
        - 2 * torch.einsum("bhtd,bhgd->bhgt", vv, o)
        + (o * o).sum(-1)[..., None]
    )
    return torch.sqrt((p * p * sigma * sigma * spread).sum(-1)).reshape(b, hq)
