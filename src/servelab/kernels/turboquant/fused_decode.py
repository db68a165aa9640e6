"""Fused TurboQuant decode attention: the entry points and the choice of backend.

``fused_decode_attention`` reads the packed cache directly (softmax(scale·q·k̃ᵀ)·ṽ without a
dequantized copy); ``fused_decode_attention_dense`` is the same path over fp16/bf16 K/V, the
uncompressed baseline. Every shape, dtype and layout is checked on the host before the first
launch (:mod:`.fused_checks`), then one backend runs the call:

- :mod:`.fused_words_cuda` (``csrc/tq4_decode.cu``): 4-bit keys and values
  (``turboquant_4bit_nc``) on CUDA where nvcc is found, unless ``LaunchConfig.backend`` says
  ``"triton"``;
- :mod:`.fused_words_triton`: 4-bit keys and values elsewhere, and the dense baseline (codes
  read as 32-bit words);
- :mod:`.fused_generic_triton`: every other preset (FP8 keys, 3-bit codes), and everything
  when ``LaunchConfig.generic``.

The Triton backends import Triton: this module is not imported by ``servelab.kernels.
turboquant`` so the rest works where Triton is absent.
"""

from __future__ import annotations

import math

import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant import fused_checks as checks
from servelab.kernels.turboquant import fused_words_cuda as cuda_words
from servelab.kernels.turboquant.attention import check_decode_shapes
from servelab.kernels.turboquant.fused_config import (
    BACKENDS,
    LOG2E,
    DecodeConstants,
    LaunchConfig,
)
from servelab.kernels.turboquant.fused_generic_triton import (
    KMODE_CODEBOOK,
    KMODE_DENSE,
    KMODE_FP8,
    VMODE_DENSE,
    VMODE_UNIFORM,
    launch_generic,
)
from servelab.kernels.turboquant.fused_words_cuda import takes
from servelab.kernels.turboquant.fused_words_triton import as_words, launch_words, word_args
from servelab.kernels.turboquant.kvcache import KVCodec, PackedKVCache

__all__ = [
    "BACKENDS",
    "DecodeConstants",
    "LaunchConfig",
    "check_pending",
    "fused_decode_attention",
    "fused_decode_attention_dense",
]

DEFAULT_CONFIG = LaunchConfig()  # frozen: one shared default is safe


def fused_decode_attention(
    q: torch.Tensor,
    cache: PackedKVCache,
    codec: KVCodec,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    constants: DecodeConstants | None = None,
    config: LaunchConfig = DEFAULT_CONFIG,
    check_values: bool = True,
) -> torch.Tensor:
    """softmax(scale·q·k̃ᵀ)·ṽ over the packed cache; q [B, Hq, d] → out [B, Hq, d].

    ``check_values`` checks q (finite) and seq_lens (in [1, T]). On the CUDA kernel the kernel
    checks them on the device and the next call on any cache (or :func:`check_pending`)
    raises for a call that failed, with no device synchronization; elsewhere the checks scan
    them on the host side first (a device sync). A decode loop that has validated them
    upstream passes False.
    """
    where = "fused_decode_attention"
    key = None
    if isinstance(q, torch.Tensor) and q.is_cuda and config.backend != "triton":
        cuda_words.raise_pending(where)
        key = (q.shape, q.dtype, q.device, codec, scale, constants, config,
               cuda_words.raw_stream(q.device))  # fmt: skip
        plan = cuda_words.cached_plan(cache, key)
        if plan is not None:  # this call's shape was validated when the plan was made
            out = checks.check_out(out, q, where)
            if out.dtype in cuda_words.DTYPES:
                b, _, _ = plan.shape
                lens = checks.given_lens(seq_lens, b, plan.tokens, plan.device, False, where)
                return plan(q, lens, out, check_values)
    b, _, hkv, t, d = check_decode_shapes(q, tuple(cache.key_codes.shape), cache.head_size, where)
    codec.check_cache(cache, where)
    checks.check_backend(config, where)
    checks.check_head_size(d, where)
    dev = checks.check_device([q, *cache.planes()], where)
    out = checks.check_out(out, q, where)
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
        if word_kernel and not config.generic and takes(config, q, d, cache, out, where):
            assert key is not None  # takes() needs a CUDA device
            plan = cuda_words.build_plan(q, rot, cache, consts.centroids, qk_scale, config,
                                         key[-1])  # fmt: skip
            cuda_words.keep_plan(cache, key, plan)
            return plan(q, checks.given_lens(seq_lens, b, t, dev, False, where), out,
                        check_values)  # fmt: skip
        qk = q.float() @ rot  # Πq for each head, once per step
    given = checks.given_lens(seq_lens, b, t, dev, check_values, where)
    checks.check_finite(q, check_values, where)
    lens = checks.or_full(given, b, t, dev)
    if word_kernel and not config.generic and cache.key_scales is not None:
        return launch_words(
            qk.contiguous(),
            as_words(cache.key_codes),
            cache.key_scales,
            as_words(cache.value_codes),
            cache.value_scale_zero,
            cent,
            lens,
            qk_scale,
            out,
            t,
            **word_args(config, q.device, b, hkv, t),
        )
    return launch_generic(
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


def check_pending(device: torch.device | None = None) -> None:
    """Wait for ``device``'s queued work (a synchronization, on purpose), then raise
    KernelInputError if the device checks of any CUDA-kernel call have failed since the last
    report. Calls raise for their predecessors anyway, without waiting: this is for the end of
    a loop, or a test."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)
    cuda_words.raise_pending("check_pending")


def fused_decode_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig = DEFAULT_CONFIG,
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
    checks.check_head_size(d, where)
    dev = checks.check_device([q, k, v], where)
    out = checks.check_out(out, q, where)
    lens = checks.seq_lens_or_full(seq_lens, b, t, dev, check_values, where)
    checks.check_finite(q, check_values, where)
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    if not config.generic and k.stride(-1) == 1 and v.stride(-1) == 1:
        return launch_words(
            q.contiguous(), k, None, v, None, None, lens, sm * LOG2E, out, t,
            **word_args(config, q.device, b, hkv, t),
        )  # fmt: skip
    return launch_generic(
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
