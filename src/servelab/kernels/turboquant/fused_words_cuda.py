"""Host side of ``csrc/tq4_decode.cu``: the CUDA decode kernel for ``turboquant_4bit_nc``.

The kernel dequantizes 4-bit keys and values straight into the matrix unit's register
fragments (what Triton cannot express, see docs/kernels-turboquant.md) and is the default for
4-bit keys and values on CUDA where nvcc is present (``LaunchConfig.backend``). It takes head
sizes 64 and 128, GQA groups up to 8 and code planes whose rows are aligned for vector loads
(16 bytes for keys, 8 for values at d = 128). A call is one launch: each CTA rotates its
query rows, and the last CTA of each (sequence, KV head) merges the splits. On sm_90+ it is
launched with programmatic dependent launch (``pdl``): it may start while the previous kernel
on the stream finishes, and reads nothing before that kernel has completed.
:func:`unsupported` names what it refuses, and ``backend="auto"`` falls back to the Triton
word kernel then.

Arguments are trusted here: ``fused_decode.fused_decode_attention`` has validated them;
:func:`takes` is its choice of this backend.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from servelab.errors import KernelInputError, KernelRuntimeError
from servelab.kernels import cuda_ext
from servelab.kernels.turboquant.fused_config import LaunchConfig
from servelab.kernels.turboquant.fused_words_triton import split_plan
from servelab.kernels.turboquant.kvcache import PackedKVCache

TILE = 16  # tokens per warp step in the kernel
HEAD_SIZES = (64, 128)
MAX_GROUP = 8
WARPS = (8, 16)
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_COUNTERS: dict[tuple[int | None, int], torch.Tensor] = {}
MAX_SPLITS = 2048  # more splits add merge work and no parallelism (one CTA per SM already)
_P = ctypes.c_void_p
_L = ctypes.c_longlong
_I = ctypes.c_int
_F = ctypes.c_float


def library(device: torch.device) -> ctypes.CDLL:
    """The loaded library for ``device`` (built with nvcc on first use, then cached)."""
    return _load(cuda_ext.arch_flag(device))


@functools.cache
def _load(arch: str) -> ctypes.CDLL:
    # Memoized per process, as gather_cuda's: cuda_ext.build hashes the sources on every call.
    lib = cuda_ext.build("tq4_decode", cuda_ext.source("tq4_decode.cu"), arch).lib
    lib.tq4_decode.restype = _I
    lib.tq4_decode.argtypes = [
        _P, _L, _L, _L, _I, _P,  # q (strides, dtype), rotation
        _P, _L, _L, _L,  # key codes
        _P, _L, _L, _L,  # key scales
        _P, _L, _L, _L,  # value codes
        _P, _L, _L, _L,  # value scale/zero
        _P, _P, _I,  # centroids, seq_lens (or null), tokens
        _P, _P, _P,  # part_o, part_l, counters
        _P, _L, _L, _L, _I,  # out (strides, dtype)
        _F, _I, _I,  # qk_scale, split_len, splits
        _I, _I, _I, _I, _I, _I,  # group, hkv, batch, head size, warps, precise
        _I, _P,  # programmatic dependent launch, stream
    ]  # fmt: skip
    return lib


@functools.cache
def _pdl_capable(index: int | None) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 (asked once per device)."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def _counters(device: torch.device, stream: int, n: int) -> torch.Tensor:
    """Per (device, stream) split counters, zero between calls (the kernel's last CTA of each
    (sequence, KV head) resets its own); kept so that a call launches no memset."""
    key = (device.index, stream)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


def _aligned(t: torch.Tensor, nbytes: int) -> bool:
    size = t.element_size()
    return t.data_ptr() % nbytes == 0 and all((s * size) % nbytes == 0 for s in t.stride()[:-1])


def unsupported(q: torch.Tensor, d: int, cache: PackedKVCache, out: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot take these inputs, or None if it can."""
    if not cuda_ext.enabled(q.device):
        return "it needs a CUDA device and nvcc (SERVELAB_NO_CUDA_EXT unset)"
    if d not in HEAD_SIZES:
        return f"head size {d} is not one of {HEAD_SIZES}"
    group = int(q.shape[1]) // cache.kv_heads
    if group > MAX_GROUP:
        return f"{group} query heads per KV head exceed {MAX_GROUP}"
    if cache.key_scales is None:
        return "it needs Lloyd–Max keys with a key_scales plane"
    if cache.key_codes.stride(-1) != 1 or not _aligned(cache.key_codes, d // 8):
        return f"key code rows must be contiguous and {d // 8}-byte aligned"
    if cache.value_codes.stride(-1) != 1 or not _aligned(cache.value_codes, d // 16):
        return f"value code rows must be contiguous and {d // 16}-byte aligned"
    if cache.value_scale_zero.stride(-1) != 1 or not _aligned(cache.value_scale_zero, 4):
        return "value (scale, zero) pairs must be contiguous and 4-byte aligned"
    for plane_name, plane in zip(("key codes", "key scales", "value codes", "value scale/zero"),
                                 cache.planes(), strict=True):  # fmt: skip
        if (int(plane.shape[2]) - 1) * abs(plane.stride(2)) >= 2**31:
            return f"{plane_name}: token offsets within a (sequence, head) slice exceed 31 bits"
    if out.dtype not in DTYPES:
        return f"output dtype {out.dtype} is not float32, float16 or bfloat16"
    if q.dtype not in DTYPES:
        return f"query dtype {q.dtype} is not float32, float16 or bfloat16"
    return None


def takes(
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


def default_splits(device: torch.device, warps: int, b: int, hkv: int) -> int:
    """Every CTA resident at once: one per multiprocessor at 16 warps, two at 8 (shared
    memory: the tables, the query fragments and the warps' rings)."""
    per_sm = 1 if warps == 16 else 2
    sms = int(torch.cuda.get_device_properties(device).multi_processor_count)
    return max(1, (per_sm * sms) // (b * hkv))


def launch_cuda_words(
    q: torch.Tensor,
    rotation_t: torch.Tensor,
    cache: PackedKVCache,
    cent: torch.Tensor,
    seq_lens: torch.Tensor | None,
    qk_scale: float,
    out: torch.Tensor,
    *,
    warps: int,
    num_splits: int | None,
    precise: bool,
    pdl: bool = True,
) -> torch.Tensor:
    """Enqueue the one launch (query rotation, split attention, merge) on the current stream,
    with programmatic dependent launch if ``pdl`` and the device has compute capability 9.0.
    ``q`` is ``[B, Hq, d]`` (any strides), ``rotation_t`` Πᵀ as float32 ``[d, d]``
    contiguous, ``cent`` the 32 fp16 table entries (centroids, then their fp16 residues),
    ``seq_lens`` int32 ``[B]`` or None (every sequence full)."""
    dev = q.device
    lib = library(dev)
    b, hq, d = (int(s) for s in q.shape)
    hkv, tokens = cache.kv_heads, cache.tokens
    if cache.key_scales is None:  # unsupported() refused this already
        raise KernelRuntimeError(
            "launch_cuda_words: the cache has no key_scales plane; call it only where "
            "unsupported() returned None"
        )
    want = num_splits if num_splits is not None else default_splits(dev, warps, b, hkv)
    split_len, splits = split_plan(tokens, TILE * warps, min(want, MAX_SPLITS))
    part_o = torch.empty((b * hq * splits, d), dtype=torch.float32, device=dev)
    part_l = torch.empty((b * hq * splits,), dtype=torch.float32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    counters = _counters(dev, stream, b * hkv)
    kc, ks, vc, sz = cache.key_codes, cache.key_scales, cache.value_codes, cache.value_scale_zero
    rc = lib.tq4_decode(
        q.data_ptr(), *q.stride(), DTYPES[q.dtype], rotation_t.data_ptr(),
        kc.data_ptr(), kc.stride(0), kc.stride(1), kc.stride(2),
        ks.data_ptr(), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.data_ptr(), vc.stride(0), vc.stride(1), vc.stride(2),
        sz.data_ptr(), sz.stride(0), sz.stride(1), sz.stride(2),
        cent.data_ptr(), None if seq_lens is None else seq_lens.data_ptr(), tokens,
        part_o.data_ptr(), part_l.data_ptr(), counters.data_ptr(),
        out.data_ptr(), *out.stride(), DTYPES[out.dtype],
        qk_scale, split_len, splits, hq // hkv, hkv, b, d, warps, int(precise),
        int(pdl and _pdl_capable(dev.index)),
        ctypes.c_void_p(stream),
    )  # fmt: skip
    cuda_ext.check(lib, rc, "tq4_decode")
    return out
