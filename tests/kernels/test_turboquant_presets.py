"""vLLM preset emulation: byte sizes, packing layout, codec round trip, refused input."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant import (
    PRESETS,
    KVCodec,
    KVPreset,
    MSEQuantizer,
    PackedKVCache,
    pack_bits,
    packed_bytes,
    unpack_bits,
)
from servelab.kernels.turboquant.quantizer import MSECode

pytestmark = pytest.mark.kernels

# docs/kernels-turboquant.md §2.5: K + V bytes per token and KV head at d = 128, K/V split.
BYTES = {
    "turboquant_k8v4": (128, 68, 196),
    "turboquant_4bit_nc": (66, 68, 134),
    "turboquant_k3v4_nc": (50, 68, 118),
    "turboquant_3bit_nc": (50, 52, 102),
}
RATIOS = {
    "turboquant_k8v4": 2.61,
    "turboquant_4bit_nc": 3.82,
    "turboquant_k3v4_nc": 4.34,
    "turboquant_3bit_nc": 5.02,
}


def kv(b: int, h: int, t: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g))


def test_preset_table_is_complete() -> None:
    assert set(PRESETS) == set(BYTES)


@pytest.mark.parametrize("name", sorted(BYTES))
def test_byte_sizes_equal_the_reference_table(name: str) -> None:
    p = PRESETS[name]
    total = BYTES[name][2]
    assert (p.key_bytes(128), p.value_bytes(128), p.bytes_per_token_head(128)) == BYTES[name]
    assert round(p.byte_ratio(128), 2) == RATIOS[name]
    cache = KVCodec.build(name, 128).encode(*kv(2, 3, 5, 128, seed=0))
    assert cache.bytes_per_token_head() == total
    assert cache.nbytes() == total * 2 * 3 * 5
    assert sum(t.numel() * t.element_size() for t in cache.planes()) == cache.nbytes()


def test_byte_rules_hold_at_other_head_sizes() -> None:
    p = PRESETS["turboquant_3bit_nc"]
    assert p.bytes_per_token_head(64) == (24 + 2) + (24 + 4)
    assert p.bytes_per_token_head(96) == (36 + 2) + (36 + 4)
    assert PRESETS["turboquant_k8v4"].bytes_per_token_head(256) == 256 + 128 + 4


def test_pack_layout_is_little_endian_bit_stream() -> None:
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    # 3-bit stream, LSB first: 100 010 110 (+ 7 pad bits) -> bytes 0b11010001, 0b0
    assert pack_bits(codes, 3).tolist() == [0b11010001, 0]
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b1101]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [128, 37, 1])
def test_pack_unpack_round_trip(bits: int, dim: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + dim)
    codes = torch.randint(0, 1 << bits, (4, 3, dim), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (4, 3, packed_bytes(dim, bits)) == (4, 3, (dim * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, dim), codes)


def test_packing_refuses_bad_input() -> None:
    with pytest.raises(KernelInputError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(KernelInputError, match="bit width"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(KernelInputError, match="uint8"):
        pack_bits(torch.tensor([1], dtype=torch.int64), 4)
    with pytest.raises(KernelInputError, match="must be 48 bytes"):
        unpack_bits(torch.zeros(47, dtype=torch.uint8), 3, 128)


@pytest.mark.parametrize("name", sorted(BYTES))
def test_codec_decode_matches_the_quantizers(name: str) -> None:
    k, v = kv(1, 2, 33, 128, seed=1)
    codec = KVCodec.build(name, 128)
    cache = codec.encode(k, v)
    kd, vd = codec.decode(cache)
    if codec.key_quantizer is None:
        torch.testing.assert_close(kd, k.to(torch.float8_e4m3fn).float(), atol=0, rtol=0)
    else:
        q = codec.key_quantizer
        code = q.quantize(k)
        expected = q.dequantize(MSECode(code.indices, code.scales.half().float()))
        torch.testing.assert_close(kd, expected, atol=1e-5, rtol=1e-5)
        # NC stores ‖k‖/‖c‖ so the decoded key has (fp16-rounded) the original norm.
        torch.testing.assert_close(
            torch.linalg.vector_norm(kd, dim=-1),
            torch.linalg.vector_norm(k, dim=-1),
            rtol=1e-3,
            atol=0,
        )
    # Uniform values: error at most half a step (plus fp16 rounding of scale and zero).
    sz = cache.value_scale_zero.float()
    step = sz[..., 0:1]
    assert bool(((vd - v).abs() <= 0.5 * step + 2e-3 * (v.abs() + 1)).all())
    assert torch.equal(
        vd.amin(-1) >= sz[..., 1] - 1e-6, torch.ones_like(vd.amin(-1), dtype=torch.bool)
    )


def test_codec_is_deterministic_under_a_seed() -> None:
    k, v = kv(1, 2, 17, 128, seed=2)

    def encode(seed: int) -> PackedKVCache:
        return KVCodec.build(
            "turboquant_3bit_nc", 128, "randomized_hadamard", seed, "exact"
        ).encode(k, v)

    a, b, c = encode(4), encode(4), encode(5)
    for x, y in zip(a.planes(), b.planes(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.key_codes, c.key_codes)


def test_constant_and_zero_vectors_encode() -> None:
    k = torch.zeros(1, 1, 2, 128)
    v = torch.full((1, 1, 2, 128), 3.0)
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    kd, vd = codec.decode(codec.encode(k, v))
    assert torch.equal(kd, torch.zeros_like(kd))
    torch.testing.assert_close(vd, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_input(bad: float) -> None:
    k, v = kv(1, 1, 3, 128, seed=3)
    v[0, 0, 1, 5] = bad
    with pytest.raises(KernelInputError, match=r"KVCodec.encode\(v\).*NaN or infinite"):
        KVCodec.build("turboquant_4bit_nc", 128).encode(k, v)
    with pytest.raises(KernelInputError, match=r"KVCodec.encode\(k\).*NaN or infinite"):
        KVCodec.build("turboquant_k8v4", 128).encode(v, k)


def test_codec_refuses_bad_configuration() -> None:
    with pytest.raises(KernelInputError, match="unknown TurboQuant preset"):
        KVCodec.build("turboquant_2bit", 128)
    with pytest.raises(KernelInputError, match="head size 96 is not a power of two"):
        KVCodec.build("turboquant_4bit_nc", 96)  # vLLM's Hadamard cannot take it
    assert KVCodec.build("turboquant_4bit_nc", 96, "haar").head_size == 96
    five = dataclasses.replace(PRESETS["turboquant_4bit_nc"], name="k5", key_bits=5)
    with pytest.raises(KernelInputError, match="bit width 5"):
        KVCodec.build(five, 128)
    nine = dataclasses.replace(PRESETS["turboquant_4bit_nc"], name="v9", value_bits=9)
    with pytest.raises(KernelInputError, match="bit width 9"):
        KVCodec.build(nine, 128)
    with pytest.raises(KernelInputError, match="4-D"):
        KVCodec.build("turboquant_4bit_nc", 128).encode(torch.zeros(3, 128), torch.zeros(3, 128))


def _replace_plane(cache: PackedKVCache, **planes: torch.Tensor | None) -> PackedKVCache:
    # Only plane fields are passed; cast so the dataclass plugin does not match them to
    # preset/head_size.
    return dataclasses.replace(cache, **cast(dict[str, Any], planes))


def test_decode_refuses_a_cache_of_the_wrong_size_or_dtype() -> None:
    codec = KVCodec.build("turboquant_4bit_nc", 128)
    cache = codec.encode(*kv(1, 2, 4, 128, seed=4))
    short = _replace_plane(cache, key_codes=cache.key_codes[..., :-1])
    with pytest.raises(KernelInputError, match=r"key_codes has shape .* needs .*134 bytes"):
        codec.decode(short)
    wrong = _replace_plane(cache, key_scales=cache.key_scales.float())  # type: ignore[union-attr]
    with pytest.raises(KernelInputError, match=r"key_scales has dtype torch\.float32"):
        codec.decode(wrong)
    bf = _replace_plane(cache, value_scale_zero=cache.value_scale_zero.bfloat16())
    with pytest.raises(KernelInputError, match="value_scale_zero has dtype"):
        codec.decode(bf)
    other = KVCodec.build("turboquant_3bit_nc", 128)
    with pytest.raises(KernelInputError, match="made for turboquant_4bit_nc"):
        other.decode(cache)
    missing = _replace_plane(cache, key_scales=None)
    with pytest.raises(KernelInputError, match="needs a key_scales plane"):
        codec.decode(missing)


def test_custom_preset_is_a_plain_record() -> None:
    p = KVPreset("mine", "lloyd_max", 2, 2, False, None)
    assert p.bytes_per_token_head(128) == 32 + 2 + 32 + 4
    q = MSEQuantizer.build(128, 2)
    assert q.bits == 2
