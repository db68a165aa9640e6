"""The fused Triton decode kernel against the dequantized cache (tight) and float64 (dense).

Needs a CUDA or XPU device; the input checks, which run before any launch, are tested on CPU.
"§2.8" is a section of docs/kernels-turboquant.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import warnings
import weakref
from typing import Any

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels import cuda_ext
from servelab.kernels.turboquant import (
    KVCodec,
    PackedKVCache,
    reference_decode_attention,
    unfused_decode_attention,
)

pytestmark = pytest.mark.kernels

fused_decode = pytest.importorskip(
    "servelab.kernels.turboquant.fused_decode", reason="Triton is not installed"
)

PRESETS = ["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]


def _accelerator() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return None


@pytest.fixture
def accel() -> torch.device:
    dev = _accelerator()
    if dev is None:
        pytest.skip("the fused Triton kernel needs a CUDA or XPU device; none is visible")
    return dev


def gen(dev: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=dev).manual_seed(seed)


def strided_cache(cache: PackedKVCache, pad: int = 3) -> PackedKVCache:
    """The same cache as views into larger buffers, so token and head strides really differ."""

    def widen(t: torch.Tensor) -> torch.Tensor:
        shape = list(t.shape)
        shape[2] += 2 * pad
        big = torch.full(
            shape, 0x7F if t.dtype == torch.uint8 else float("nan"), dtype=t.dtype, device=t.device
        )
        view = big[:, :, pad : pad + t.shape[2]]
        view.copy_(t)
        return view

    return dataclasses.replace(
        cache,
        key_codes=widen(cache.key_codes),
        key_scales=None if cache.key_scales is None else widen(cache.key_scales),
        value_codes=widen(cache.value_codes),
        value_scale_zero=widen(cache.value_scale_zero),
    )


# (batch, q_heads, kv_heads, tokens, head_size, seq_lens or None): decode at batch 1, an odd
# GQA ratio (5:1, 3:1), odd lengths, one token, mixed lengths in a batch, d = 64 / 256.
SHAPES = [
    (1, 32, 8, 1, 128, None),
    (1, 32, 8, 1000, 128, None),
    (2, 6, 2, 777, 128, (777, 130)),
    (1, 5, 1, 4097, 128, None),
    (3, 4, 4, 300, 64, (1, 299, 64)),
    (1, 8, 2, 513, 256, None),
]


@pytest.mark.cuda
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_fused_matches_the_dequantized_cache(accel: torch.device, name: str, shape: tuple) -> None:  # type: ignore[type-arg]
    b, hq, hkv, t, d, lens = shape
    g = gen(accel, seed=t + d)
    k = torch.randn(b, hkv, t, d, device=accel, generator=g)
    v = torch.randn(b, hkv, t, d, device=accel, generator=g)
    codec = KVCodec.build(name, d, "randomized_hadamard", seed=3, law="exact")
    cache = strided_cache(codec.encode(k, v))
    q_big = torch.randn(b, 2 * hq, d, device=accel, generator=g) * 2.0
    q = q_big[:, ::2]  # non-contiguous query heads
    seq_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=accel)
    out = torch.full((b, hq, d), float("nan"), device=accel)
    got = fused_decode.fused_decode_attention(q, cache, codec, seq_lens=seq_lens, out=out)
    assert got is out
    want = unfused_decode_attention(q, cache, codec, seq_lens=seq_lens)
    assert bool(torch.isfinite(got).all()), "every output element must be written"
    # §2.8: atol = rtol = 1e-3. The 4-bit presets go to the word kernel (fp16 q, table and
    # p·scale: up to ~9e-4 at this sharpness); the generic kernel splits q and p·scale into
    # two fp16 terms and adds the table's fp16 residue (near 1e-6; docs/kernels-turboquant).
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3)


VARIANTS = {  # (generic, precise_table, backend, cuda_warps, cuda_wide_table)
    "generic-precise": (True, True, "triton", 16, False),
    "generic-fast": (True, False, "triton", 16, False),
    "words-precise": (False, True, "triton", 16, False),
    "cuda-precise": (False, True, "cuda", 16, False),
    "cuda-precise-wide": (False, True, "cuda", 16, True),
    "cuda-precise-8warps": (False, True, "cuda", 8, False),
    "cuda-fast": (False, False, "cuda", 16, False),
    "cuda-fast-wide": (False, False, "cuda", 16, True),
}
TIGHT = {  # the precise paths' own bound, far under §2.8's 1e-3
    "generic-precise": 2e-5,  # < 2e-5 on the H100
    # 4.6e-6 in the interpreter; on the H100 (2026-11-25) it passed 3e-4, not measured alone
    "words-precise": 3e-4,
    "cuda-precise": 2e-5,
    "cuda-precise-wide": 2e-5,
    "cuda-precise-8warps": 2e-5,
}


def needs_cuda_kernel(backend: str) -> None:
    if backend == "cuda" and not cuda_ext.enabled(torch.device("cuda")):
        pytest.skip("the CUDA kernel needs a CUDA device and nvcc")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kernel_variants_for_4bit_keys(accel: torch.device, variant: str) -> None:
    """The CUDA kernel (the default on CUDA), the Triton word kernel and the generic one,
    with and without the centroid table's fp16 residue, all within §2.8's 1e-3; with the
    residue far tighter."""
    generic, precise, backend, warps, wide = VARIANTS[variant]
    needs_cuda_kernel(backend)
    g = gen(accel, 9)
    k = torch.randn(2, 2, 777, 128, device=accel, generator=g)
    v = torch.randn(2, 2, 777, 128, device=accel, generator=g) * 3.0
    q = torch.randn(2, 6, 128, device=accel, generator=g) * 2.0
    lens = torch.tensor([777, 200], dtype=torch.int32, device=accel)
    codec = KVCodec.build("turboquant_4bit_nc", 128, "haar", seed=1, law="exact")
    cache = strided_cache(codec.encode(k, v))
    cfg = fused_decode.LaunchConfig(
        block_n=128,
        precise_table=precise,
        generic=generic,
        backend=backend,
        cuda_warps=warps,
        cuda_wide_table=wide,
    )
    out = torch.full((2, 6, 128), float("nan"), device=accel)
    got = fused_decode.fused_decode_attention(
        q, cache, codec, seq_lens=lens, out=out, config=cfg
    ).double()
    want = unfused_decode_attention(q, cache, codec, seq_lens=lens)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    if variant in TIGHT:
        torch.testing.assert_close(got, want, atol=TIGHT[variant], rtol=TIGHT[variant])


CUDA_SHAPES = [  # (batch, q_heads, kv_heads, seq_lens, head_size, splits, warps)
    (1, 32, 8, (1,), 128, None, 16),
    (1, 8, 1, (4099,), 128, 3, 8),  # group of 8, a ragged last tile
    (2, 14, 2, (5000, 17), 128, 64, 16),  # the short sequence leaves 63 splits empty
    (3, 3, 3, (300, 1, 64), 64, None, 8),  # group of 1, head size 64
    (1, 20, 4, (2048,), 64, 5, 16),  # group of 5
    (2, 16, 4, (3000, 2999), 128, 7, 8),  # group of 4, two CTAs per SM
    (1, 16, 2, (9000,), 128, 37, 16),  # group of 8, the merge's last batch of splits partial
]
# At 16 warps each shape runs with the table's rows 128 and 256 bytes apart (cuda_wide_table).
CUDA_CASES = [(*s, False) for s in CUDA_SHAPES] + [(*s, True) for s in CUDA_SHAPES if s[-1] == 16]


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape", CUDA_CASES, ids=lambda s: "-".join(map(str, s[:-1])) + ("-wide" if s[-1] else "")
)
def test_cuda_kernel_shapes(accel: torch.device, shape: tuple) -> None:  # type: ignore[type-arg]
    """The CUDA kernel's fragment layout at every group size, head size and tile edge it
    takes, empty splits included, against the dequantized cache (precise path)."""
    needs_cuda_kernel("cuda")
    b, hq, hkv, lens_t, d, splits, warps, wide = shape
    t = max(lens_t)
    g = gen(accel, t + hq)
    k = torch.randn(b, hkv, t, d, device=accel, generator=g)
    v = torch.randn(b, hkv, t, d, device=accel, generator=g) * 2.0
    q = torch.randn(b, hq, d, device=accel, generator=g) * 2.0
    if hq == 8:  # the rotation kernel reads bf16 queries too
        q = q.to(torch.bfloat16)
    lens = torch.tensor(lens_t, dtype=torch.int32, device=accel)
    codec = KVCodec.build("turboquant_4bit_nc", d, "randomized_hadamard", seed=2, law="exact")
    cache = codec.encode(k, v)
    cfg = fused_decode.LaunchConfig(
        backend="cuda", num_splits=splits, cuda_warps=warps, cuda_wide_table=wide
    )
    out = torch.full((b, hq, d), float("nan"), dtype=torch.bfloat16, device=accel)
    got = fused_decode.fused_decode_attention(q, cache, codec, seq_lens=lens, out=out, config=cfg)
    want = unfused_decode_attention(q, cache, codec, seq_lens=lens)
    assert bool(torch.isfinite(got).all()), "every output element must be written"
    # bf16 output: its rounding (2^-9 relative) is the bound here.
    torch.testing.assert_close(got.double(), want, atol=4e-3, rtol=4e-3)
    out32 = torch.full((b, hq, d), float("nan"), device=accel)
    got32 = fused_decode.fused_decode_attention(
        q, cache, codec, seq_lens=lens, out=out32, config=cfg
    )
    torch.testing.assert_close(got32.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.cuda
def test_cuda_kernel_back_to_back_calls_with_and_without_pdl(accel: torch.device) -> None:
    """Calls queued back to back, each over its own cache with its own split count, share the
    stream's split counters and (with programmatic dependent launch) overlap the previous
    call's tail: each output must still be its own, and launching without PDL must give the
    same bits."""
    needs_cuda_kernel("cuda")
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    g = gen(accel, 77)
    calls = []
    for i, tokens in enumerate((5000, 300, 9000, 17)):
        k = torch.randn(1, 4, tokens, 128, device=accel, generator=g)
        v = torch.randn(1, 4, tokens, 128, device=accel, generator=g) * (1 + i)
        q = torch.randn(1, 16, 128, device=accel, generator=g)
        calls.append((q, codec.encode(k, v), (None, 3, 64, 1)[i]))
    got = {}
    for pdl in (True, False):
        outs = []
        for q, cache, splits in calls:  # queued without a synchronize between them
            cfg = fused_decode.LaunchConfig(backend="cuda", num_splits=splits, cuda_pdl=pdl)
            out = torch.full((1, 16, 128), float("nan"), device=accel)
            outs.append(fused_decode.fused_decode_attention(q, cache, codec, out=out, config=cfg))
        torch.cuda.synchronize(accel)
        got[pdl] = outs
    for (q, cache, _), with_pdl, without in zip(calls, got[True], got[False], strict=True):
        want = unfused_decode_attention(q, cache, codec)
        torch.testing.assert_close(with_pdl.double(), want, atol=2e-5, rtol=2e-5)
        assert torch.equal(with_pdl, without)


@pytest.mark.cuda
def test_backend_cuda_names_what_it_cannot_take(accel: torch.device) -> None:
    needs_cuda_kernel("cuda")
    codec = KVCodec.build("turboquant_4bit_nc", 256)
    k = torch.randn(1, 2, 9, 256, device=accel)
    cfg = fused_decode.LaunchConfig(backend="cuda")
    with pytest.raises(KernelInputError, match="backend='cuda' cannot run here: head size 256"):
        fused_decode.fused_decode_attention(
            torch.zeros(1, 4, 256, device=accel), codec.encode(k, k), codec, config=cfg
        )


def test_fused_refuses_an_unknown_backend() -> None:
    q, cache, codec = _small()
    with pytest.raises(KernelInputError, match=r"LaunchConfig\.backend is 'cudnn'"):
        fused_decode.fused_decode_attention(
            q, cache, codec, config=fused_decode.LaunchConfig(backend="cudnn")
        )
    with pytest.raises(KernelInputError, match=r"LaunchConfig\.cuda_warps is 6"):
        fused_decode.fused_decode_attention(
            q, cache, codec, config=fused_decode.LaunchConfig(cuda_warps=6)
        )
    with pytest.raises(KernelInputError, match=r"cuda_wide_table needs cuda_warps=16.*is 8"):
        fused_decode.fused_decode_attention(
            q, cache, codec, config=fused_decode.LaunchConfig(cuda_warps=8, cuda_wide_table=True)
        )
    not_a_bool: Any = "yes"
    with pytest.raises(KernelInputError, match=r"LaunchConfig\.cuda_wide_table is 'yes'"):
        fused_decode.fused_decode_attention(
            q, cache, codec, config=fused_decode.LaunchConfig(cuda_wide_table=not_a_bool)
        )
    with pytest.raises(KernelInputError, match=r"LaunchConfig\.cuda_pdl is 'yes'"):
        fused_decode.fused_decode_attention(
            q, cache, codec, config=fused_decode.LaunchConfig(cuda_pdl=not_a_bool)
        )


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 7, 64])
def test_split_count_does_not_change_the_result(accel: torch.device, splits: int) -> None:
    g = gen(accel, 5)
    k = torch.randn(1, 2, 3000, 128, device=accel, generator=g)
    v = torch.randn(1, 2, 3000, 128, device=accel, generator=g)
    q = torch.randn(1, 8, 128, device=accel, generator=g)
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    cache = codec.encode(k, v)
    cfg = fused_decode.LaunchConfig(num_splits=splits)
    got = fused_decode.fused_decode_attention(q, cache, codec, config=cfg)
    torch.testing.assert_close(
        got.double(), unfused_decode_attention(q, cache, codec), atol=1e-3, rtol=1e-3
    )


@pytest.mark.cuda
def test_fused_is_deterministic(accel: torch.device) -> None:
    g = gen(accel, 6)
    k = torch.randn(1, 8, 5000, 128, device=accel, generator=g)
    q = torch.randn(1, 32, 128, device=accel, generator=g)
    codec = KVCodec.build("turboquant_3bit_nc", 128)
    cache = codec.encode(k, k.flip(2))
    a = fused_decode.fused_decode_attention(q, cache, codec)
    b = fused_decode.fused_decode_attention(q, cache, codec)
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_path_matches_float64(accel: torch.device, dtype: torch.dtype) -> None:
    g = gen(accel, 7)
    k = torch.randn(2, 4, 2049, 128, device=accel, generator=g).to(dtype)
    v = torch.randn(2, 4, 2049, 128, device=accel, generator=g).to(dtype)
    q = torch.randn(2, 12, 128, device=accel, generator=g).to(dtype)
    lens = torch.tensor([2049, 1000], dtype=torch.int32, device=accel)
    out = torch.full((2, 12, 128), float("nan"), device=accel)
    got = fused_decode.fused_decode_attention_dense(q, k, v, seq_lens=lens, out=out)
    want = reference_decode_attention(q, k, v, seq_lens=lens)
    # q and p are rounded to the K/V dtype before the matrix unit: 2^-8 (bf16) / 2^-11 (fp16)
    # relative; vLLM's flash-attention tests use 1.5e-2 / 1e-2 for bf16.
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.cuda
def test_full_path_matches_float64_loosely(accel: torch.device) -> None:
    """Reference 2 on the device: quantize-then-attend against unquantized float64."""
    g = gen(accel, 8)
    k = torch.randn(1, 8, 4096, 128, device=accel, generator=g)
    v = torch.randn(1, 8, 4096, 128, device=accel, generator=g)
    q = torch.randn(1, 32, 128, device=accel, generator=g)
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    got = fused_decode.fused_decode_attention(q, codec.encode(k, v), codec).double()
    want = reference_decode_attention(q, k, v)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cos.min()) > 0.98
    assert float((got - want).norm() / want.norm()) < 0.17


# Input checks run before any launch; CPU tensors reach them too (the device check is last).


def _small(
    name: str = "turboquant_4bit_nc", d: int = 128
) -> tuple[torch.Tensor, PackedKVCache, KVCodec]:
    codec = KVCodec.build(name, d, "haar")
    k = torch.randn(1, 2, 9, d, generator=torch.Generator().manual_seed(0))
    return torch.zeros(1, 4, d), codec.encode(k, k), codec


def test_fused_refuses_a_cache_of_the_wrong_size_or_dtype() -> None:
    q, cache, codec = _small()
    short = dataclasses.replace(cache, value_codes=cache.value_codes[..., :-1])
    with pytest.raises(KernelInputError, match="value_codes has shape"):
        fused_decode.fused_decode_attention(q, short, codec)
    as_int = dataclasses.replace(cache, key_codes=cache.key_codes.to(torch.int16))
    with pytest.raises(KernelInputError, match=r"key_codes has dtype torch\.int16"):
        fused_decode.fused_decode_attention(q, as_int, codec)
    with pytest.raises(KernelInputError, match="not a multiple of 2 KV heads"):
        fused_decode.fused_decode_attention(torch.zeros(1, 3, 128), cache, codec)


def test_fused_refuses_a_head_size_it_cannot_take() -> None:
    _, cache, codec = _small(d=96)
    with pytest.raises(KernelInputError, match="head size 96 is not supported by the fused"):
        fused_decode.fused_decode_attention(torch.zeros(1, 4, 96), cache, codec)


def test_fused_refuses_cpu_tensors_with_a_pointer_to_the_unfused_path() -> None:
    q, cache, codec = _small()
    with pytest.raises(KernelInputError, match="unfused_decode_attention"):
        fused_decode.fused_decode_attention(q, cache, codec)


def test_dense_refuses_bad_kv() -> None:
    k = torch.zeros(1, 2, 5, 128, dtype=torch.float32)
    with pytest.raises(KernelInputError, match="float16 or bfloat16"):
        fused_decode.fused_decode_attention_dense(torch.zeros(1, 2, 128), k, k)
    with pytest.raises(KernelInputError, match="one shape and dtype"):
        fused_decode.fused_decode_attention_dense(torch.zeros(1, 2, 128), k.half(), k.bfloat16())


@pytest.mark.cuda
def test_fused_refuses_nan_query_before_launch(accel: torch.device) -> None:
    """The Triton kernels check values on the host side before the launch (a sync)."""
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    cfg = fused_decode.LaunchConfig(backend="triton")
    k = torch.randn(1, 2, 9, 128, device=accel)
    q = torch.zeros(1, 4, 128, device=accel)
    q[0, 1, 3] = float("nan")
    with pytest.raises(KernelInputError, match="NaN or infinite"):
        fused_decode.fused_decode_attention(q, codec.encode(k, k), codec, config=cfg)
    lens = torch.tensor([10], dtype=torch.int32, device=accel)
    with pytest.raises(KernelInputError, match="seq_lens"):
        fused_decode.fused_decode_attention(
            q.nan_to_num(), codec.encode(k, k), codec, seq_lens=lens, config=cfg
        )


@pytest.mark.cuda
def test_cuda_kernel_checks_values_on_the_device_without_a_sync(accel: torch.device) -> None:
    """The CUDA kernel checks q and seq_lens itself: a checked call makes no synchronizing
    torch call (sync debug mode "error"), a bad call is reported by the next call or by
    check_pending, and a length past the cache is clamped to it, never read past."""
    needs_cuda_kernel("cuda")
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    cfg = fused_decode.LaunchConfig(backend="cuda")
    g = gen(accel, 5)
    k = torch.randn(2, 2, 300, 128, device=accel, generator=g)
    q = torch.randn(2, 8, 128, device=accel, generator=g)
    cache = codec.encode(k, k * 0.5)
    consts = fused_decode.DecodeConstants.build(codec, accel)
    fused_decode.check_pending(accel)  # nothing left over from other tests

    def call(qq: torch.Tensor, lens: torch.Tensor | None, check: bool = True) -> torch.Tensor:
        out: torch.Tensor = fused_decode.fused_decode_attention(
            qq, cache, codec, seq_lens=lens, constants=consts, config=cfg, check_values=check
        )
        return out

    full = call(q, None)  # builds the plan (its constants go to the device once)
    bad_q = q.clone()
    bad_q[1, 5, 7] = float("inf")
    past = torch.tensor([300, 301], dtype=torch.int32, device=accel)
    whole = torch.tensor([300, 300], dtype=torch.int32, device=accel)
    try:
        with warnings.catch_warnings():
            # torch warns that the mode is a prototype that does not yet detect every
            # synchronizing operation (the ini makes warnings errors; on the H100,
            # 2026-12-07, the warning failed this test with the mode left on "error", which
            # then failed the next test's first sync): what it detects still raises.
            warnings.filterwarnings("ignore", "Synchronization debug mode", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        good = call(q, whole)
        call(bad_q, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(KernelInputError, match=r"call #\d+: q holds NaN or infinite values"):
        fused_decode.check_pending(accel)
    torch.testing.assert_close(good, full, atol=0, rtol=0)
    clamped = call(q, past)
    with pytest.raises(KernelInputError, match=r"earlier call .*seq_lens entry lies outside"):
        torch.cuda.synchronize(accel)
        call(q, None)  # the next call reports its predecessor, before launching
    torch.testing.assert_close(clamped, full, atol=0, rtol=0)
    call(bad_q, past, check=False)
    fused_decode.check_pending(accel)  # unchecked calls report nothing


@pytest.mark.cuda
def test_cuda_plan_takes_new_strides_lengths_and_outputs(accel: torch.device) -> None:
    """A call that reuses a plan (same cache, query shape, codec, configuration) still reads
    this call's query strides, int64 lengths and output dtype."""
    needs_cuda_kernel("cuda")
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    cfg = fused_decode.LaunchConfig(backend="cuda", num_splits=5)
    g = gen(accel, 6)
    k = torch.randn(2, 2, 700, 128, device=accel, generator=g)
    cache = codec.encode(k, k.flip(2))
    big = torch.randn(2, 16, 128, device=accel, generator=g)
    q = big[:, ::2, :]  # strided view, shape [2, 8, 128]
    lens = torch.tensor([700, 123], dtype=torch.int64, device=accel)
    fused_decode.fused_decode_attention(q.contiguous(), cache, codec, config=cfg)  # the plan
    got = fused_decode.fused_decode_attention(
        q, cache, codec, seq_lens=lens, config=cfg, out=torch.empty(2, 8, 128, device=accel,
                                                                     dtype=torch.float16)
    )  # fmt: skip
    want = unfused_decode_attention(q, cache, codec, seq_lens=lens)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)


def test_cuda_plans_go_with_their_cache_and_stay_bounded() -> None:
    """Plans are kept per cache (weakly: they die with it), at most PLANS_PER_CACHE each."""
    import gc

    from servelab.kernels.turboquant import fused_words_cuda as cw

    codec = KVCodec.build("turboquant_4bit_nc", 128)
    cache = codec.encode(torch.randn(1, 1, 4, 128), torch.randn(1, 1, 4, 128))
    alive = weakref.ref(cache)
    gc.collect()  # caches of earlier tests that are already garbage go first (seen on the H100)
    before = len(cw._PLANS)
    marker: Any = object()
    for i in range(cw.PLANS_PER_CACHE + 3):
        cw.keep_plan(cache, (i,), marker)
    assert cw.cached_plan(cache, (0,)) is None  # the oldest went first
    assert cw.cached_plan(cache, (cw.PLANS_PER_CACHE + 2,)) is marker
    assert len(cw._PLANS[cache]) == cw.PLANS_PER_CACHE
    del cache
    gc.collect()
    assert alive() is None, "the plans kept their cache alive"
    assert len(cw._PLANS) == before


def test_the_host_mirror_of_the_launch_struct_matches_the_kernel() -> None:
    """Built by the real nvcc where one is found (no device needed): loading the library
    binds its three exports (one missing raises) and compares the ctypes mirror with the
    kernel's sizeof/offsetof (a mismatch raises)."""
    if cuda_ext.find_nvcc() is None:
        pytest.skip("no nvcc on this machine; the GPU machine checks it at every load")
    from servelab.kernels.turboquant import fused_words_cuda as cw

    lib = cw._load("-arch=sm_90")
    layout = (ctypes.c_longlong * 3)()
    lib.tq4_layout(layout)
    assert tuple(layout) == (
        ctypes.sizeof(cw._Args),
        cw._Args.errors.offset,
        ctypes.sizeof(cw._Launch),
    )
