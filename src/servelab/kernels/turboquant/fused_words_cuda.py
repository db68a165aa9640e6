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

A call costs little host time: ``fused_decode`` validates a (cache, query shape, codec,
configuration, stream) once and keeps a :class:`CudaPlan` for it (the launch struct filled,
the scratch allocated); later calls set the query and output fields and make one ctypes
call. Value checks (q finite, seq_lens in [1, tokens]) run in the kernel: a failing call
writes its id into pinned host words that the next call reads without a device
synchronization (:func:`pending_error`). Lengths outside the cache are clamped whether
checked or not, so no call reads past the planes.

Arguments are trusted here: ``fused_decode.fused_decode_attention`` has validated them;
:func:`takes` is its choice of this backend.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import weakref
from dataclasses import dataclass
from typing import Any

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
_U = ctypes.c_uint32


def _fields(names: str, ctype: type) -> list[tuple[str, type]]:
    return [(n, ctype) for n in names.split()]


class _Args(ctypes.Structure):
    """Mirror of ``Args`` in csrc/tq4_tiles.cuh (checked against ``tq4_layout`` at load)."""

    _fields_ = [
        ("q", _P), *_fields("sqb sqh sqd", _L), ("qdtype", _I), ("rot", _P),
        ("kc", _P), *_fields("skb skh skt", _L), ("ks", _P), *_fields("sksb sksh skst", _L),
        ("vc", _P), *_fields("svb svh svt", _L), ("vsz", _P), *_fields("szb szh szt", _L),
        ("cent", _P), ("seq_lens", _P), ("tokens", _I), ("part_o", _P), ("part_l", _P),
        ("counters", _P), ("out", _P), *_fields("sob soh sod", _L), ("odtype", _I),
        ("qk_scale", _F), *_fields("split_len num_splits group", _I),
        *_fields("lo_mask hi_mask", _U), ("errors", _P), ("call_id", _I),
    ]  # fmt: skip


class _Launch(ctypes.Structure):
    """Mirror of ``Launch``: the arguments and the launch's shape."""

    _fields_ = [("a", _Args), *_fields("hkv batch head_size warps precise pdl wide", _I)]


def library(device: torch.device) -> ctypes.CDLL:
    """The loaded library for ``device`` (built with nvcc on first use, then cached)."""
    return _load(cuda_ext.arch_flag(device))


@functools.cache
def _load(arch: str) -> ctypes.CDLL:
    # Memoized per process, as gather_cuda's: cuda_ext.build hashes the sources on every call.
    lib = cuda_ext.build("tq4_decode", cuda_ext.source("tq4_decode.cu"), arch).lib
    lib.tq4_decode.restype = _I
    lib.tq4_decode.argtypes = [_P, _P]  # &Launch, stream
    lib.tq4_error_words.restype = _I
    lib.tq4_error_words.argtypes = [ctypes.POINTER(ctypes.POINTER(_I)), _I]
    layout = (_L * 3)()
    lib.tq4_layout.argtypes = [ctypes.POINTER(_L)]
    lib.tq4_layout(layout)
    mirror = (ctypes.sizeof(_Args), _Args.errors.offset, ctypes.sizeof(_Launch))
    if tuple(layout) != mirror:
        raise KernelRuntimeError(
            f"tq4_decode: the host's mirror of Args/Launch {mirror} differs from the "
            f"library's {tuple(layout)} (sizeof Args, offsetof errors, sizeof Launch); "
            "fused_words_cuda._Args must follow csrc/tq4_tiles.cuh"
        )
    return lib


# Value-check words: [0] the id of a call whose q held NaN or infinity, [1] of a call whose
# seq_lens left [1, tokens]; 0 while none has. Pinned host memory every device writes.
CHECKS = ("q holds NaN or infinite values", "a seq_lens entry lies outside [1, tokens]")
_ERRORS: list[ctypes.Array[ctypes.c_int]] = []
_CALLS = itertools.count(1)


def _error_words(lib: ctypes.CDLL) -> ctypes.Array[ctypes.c_int]:
    if not _ERRORS:
        ptr = ctypes.POINTER(_I)()
        cuda_ext.check(lib, lib.tq4_error_words(ctypes.byref(ptr), len(CHECKS)), "tq4_error_words")
        _ERRORS.append((_I * len(CHECKS)).from_address(ctypes.addressof(ptr.contents)))
    return _ERRORS[0]


def raise_pending(where: str) -> None:
    """Raise KernelInputError if an earlier call's device checks failed (and clear them)."""
    found = pending_error()
    if found is not None:
        raise KernelInputError(
            f"{where}: the device checks of an earlier call failed ({found}); its output is "
            "unreliable (a NaN query gives NaN, a length outside the cache is clamped to it). "
            "Calls are numbered as they were enqueued; check_values=False skips the checks"
        )


def pending_error() -> str | None:
    """What the device checks of an earlier call found, or None; clears it. Reads host memory
    the kernels write: no synchronization, so a call still queued has not reported yet."""
    if not _ERRORS:
        return None
    words = _ERRORS[0]
    found = [f"call #{words[i]}: {what}" for i, what in enumerate(CHECKS) if words[i]]
    if not found:
        return None
    for i in range(len(CHECKS)):
        words[i] = 0
    return "; ".join(found)


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


@dataclass(eq=False)
class CudaPlan:
    """One validated call shape on one stream: a cache, a query shape and dtype, the codec's
    constants, a configuration. The launch struct is filled once; a call sets only the query,
    output, lengths and check fields, then makes one ctypes call (the host cost per call is
    what ``benchmarks/kernels/tq4_speed.py`` reports). It holds every tensor whose address the
    struct holds, and assumes the cache's planes are not moved (``resize_``/``set_``)."""

    launch: _Launch
    addr: int
    fn: Any
    keep: tuple[torch.Tensor, ...]
    shape: tuple[int, int, int]
    tokens: int
    device: torch.device
    stream: int
    errors: int  # address of the value-check words

    def __call__(
        self, q: torch.Tensor, seq_lens: torch.Tensor | None, out: torch.Tensor, check: bool
    ) -> torch.Tensor:
        """Enqueue the call: ``q`` of this plan's shape, dtype and device (any strides), ``out``
        checked by the caller, ``seq_lens`` int32 ``[B]`` contiguous or None. ``check``: the
        kernel checks q and seq_lens on the device and reports to the error words."""
        a = self.launch.a
        a.q = q.data_ptr()
        a.sqb, a.sqh, a.sqd = q.stride()
        a.out = out.data_ptr()
        a.sob, a.soh, a.sod = out.stride()
        a.odtype = DTYPES[out.dtype]
        a.seq_lens = None if seq_lens is None else seq_lens.data_ptr()
        if check:
            a.errors = self.errors
            a.call_id = next(_CALLS)
        else:
            a.errors = None
        rc = self.fn(self.addr, self.stream)
        if rc:
            cuda_ext.check(library(self.device), rc, "tq4_decode")
        return out


_PLANS: weakref.WeakKeyDictionary[PackedKVCache, dict[tuple[Any, ...], CudaPlan]] = (
    weakref.WeakKeyDictionary()
)
PLANS_PER_CACHE = 16  # the oldest goes first (keys differ by stream, dtype, configuration)


def raw_stream(device: torch.device) -> int:
    """The current stream's handle on ``device`` (what torch.cuda.current_stream().cuda_stream
    gives, without building a Stream object)."""
    return int(torch._C._cuda_getCurrentRawStream(device.index))


def cached_plan(cache: PackedKVCache, key: tuple[Any, ...]) -> CudaPlan | None:
    plans = _PLANS.get(cache)
    return None if plans is None else plans.get(key)


def keep_plan(cache: PackedKVCache, key: tuple[Any, ...], plan: CudaPlan) -> None:
    plans = _PLANS.setdefault(cache, {})
    if len(plans) >= PLANS_PER_CACHE:
        del plans[next(iter(plans))]
    plans[key] = plan


def build_plan(
    q: torch.Tensor,
    rotation_t: torch.Tensor,
    cache: PackedKVCache,
    cent: torch.Tensor,
    qk_scale: float,
    cfg: LaunchConfig,
    stream: int,
) -> CudaPlan:
    """The plan for calls like this one (validated by ``fused_decode``; :func:`unsupported`
    returned None): scratch for the splits' partials, the stream's split counters, Πᵀ as
    float32 ``[d, d]`` contiguous, ``cent`` the 32 fp16 table entries (centroids, then their
    fp16 residues). Programmatic dependent launch if ``cfg.cuda_pdl`` and the device has
    compute capability 9.0."""
    dev = q.device
    lib = library(dev)
    b, hq, d = (int(s) for s in q.shape)
    hkv, tokens = cache.kv_heads, cache.tokens
    if cache.key_scales is None:  # unsupported() refused this already
        raise KernelRuntimeError(
            "build_plan: the cache has no key_scales plane; call it only where "
            "unsupported() returned None"
        )
    want = cfg.num_splits
    if want is None:
        want = default_splits(dev, cfg.cuda_warps, b, hkv)
    split_len, splits = split_plan(tokens, TILE * cfg.cuda_warps, min(want, MAX_SPLITS))
    part_o = torch.empty((b * hq * splits, d), dtype=torch.float32, device=dev)
    part_l = torch.empty((b * hq * splits,), dtype=torch.float32, device=dev)
    counters = _counters(dev, stream, b * hkv)
    kc, ks, vc, sz = cache.key_codes, cache.key_scales, cache.value_codes, cache.value_scale_zero
    la = _Launch()
    a = la.a
    a.rot, a.cent, a.tokens = rotation_t.data_ptr(), cent.data_ptr(), tokens
    a.kc, (a.skb, a.skh, a.skt) = kc.data_ptr(), kc.stride()[:3]
    a.ks, (a.sksb, a.sksh, a.skst) = ks.data_ptr(), ks.stride()[:3]
    a.vc, (a.svb, a.svh, a.svt) = vc.data_ptr(), vc.stride()[:3]
    a.vsz, (a.szb, a.szh, a.szt) = sz.data_ptr(), sz.stride()[:3]
    a.part_o, a.part_l, a.counters = part_o.data_ptr(), part_l.data_ptr(), counters.data_ptr()
    a.qdtype, a.qk_scale = DTYPES[q.dtype], qk_scale
    a.split_len, a.num_splits, a.group = split_len, splits, hq // hkv
    la.hkv, la.batch, la.head_size = hkv, b, d
    la.warps, la.precise = cfg.cuda_warps, int(cfg.precise_table)
    la.wide = int(cfg.cuda_wide_table)
    la.pdl = int(cfg.cuda_pdl and _pdl_capable(dev.index))
    errors = _error_words(lib)
    return CudaPlan(
        launch=la,
        addr=ctypes.addressof(la),
        fn=lib.tq4_decode,
        keep=(rotation_t, cent, part_o, part_l, counters, *cache.planes()),
        shape=(b, hq, d),
        tokens=tokens,
        device=dev,
        stream=stream,
        errors=ctypes.addressof(errors),
    )
