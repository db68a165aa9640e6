"""Attention over the emulated presets: logit error, predicted drift, round trip, two references.

Reference 1 (tight) is the fused kernel against the dequantized cache (test_turboquant_fused).
Reference 2 (here) is the full quantize-then-attend path against float64 attention over the
unquantized K/V: loose bounds derived from theory plus cosine floors. "§2.x" is a section of
docs/kernels-turboquant.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant import (
    KVCodec,
    MSEQuantizer,
    reference_decode_attention,
    unfused_decode_attention,
)
from servelab.kernels.turboquant.attention import predict_key_drift

pytestmark = pytest.mark.kernels

D = 128
LLOYD_PRESETS = ["turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]
ALL_PRESETS = ["turboquant_k8v4", *LLOYD_PRESETS]


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("name", LLOYD_PRESETS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logit_error_matches_temperature_times_sqrt_distortion(
    name: str, temperature: float
) -> None:
    """⟨q, k − k̃⟩ for unit k and q ~ N(0, τ²·I): std = τ·√D_mse (§2.8, ±10 %)."""
    codec = KVCodec.build(name, D)
    k = gaussian(1, 1, 8192, D, seed=1)
    k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    kd, _ = codec.decode(codec.encode(k, k), torch.float64)
    q = temperature * gaussian(64, D, seed=2)
    err = torch.einsum("qd,td->qt", q, (kd - k)[0, 0])
    predicted = codec.predicted_key_distortion()
    assert predicted is not None
    assert float(err.std()) == pytest.approx(temperature * math.sqrt(predicted), rel=0.10)
    # Control: the 4-bit figure would be wrong for 3-bit keys by ~1.9×, and the other way.
    other = KVCodec.build("turboquant_4bit_nc" if "3" in name else "turboquant_3bit_nc", D)
    wrong = other.predicted_key_distortion()
    assert wrong is not None
    assert abs(float(err.std()) / (temperature * math.sqrt(wrong)) - 1) > 0.3


def test_logit_error_of_the_plain_mse_quantizer() -> None:
    q_mse = MSEQuantizer.build(D, 3, "haar", seed=0)
    k = gaussian(8192, D, seed=3)
    k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    kd = q_mse.dequantize(q_mse.quantize(k), torch.float64)
    q = 2.0 * gaussian(64, D, seed=4)
    err = q @ (kd - k).T
    assert float(err.std()) == pytest.approx(
        2.0 * math.sqrt(q_mse.codebook.expected_mse()), rel=0.10
    )


@pytest.mark.parametrize("name", LLOYD_PRESETS)
@pytest.mark.parametrize("tokens", [256, 2048])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_key_drift_matches_first_order_prediction(name: str, tokens: int, alpha: float) -> None:
    """K quantized, V exact: the output error over 32 heads within ±20 % of the prediction."""
    codec = KVCodec.build(name, D)
    k = gaussian(1, 4, tokens, D, seed=tokens)
    v = gaussian(1, 4, tokens, D, seed=tokens + 1)
    q = alpha * gaussian(1, 32, D, seed=tokens + 2)
    kd, _ = codec.decode(codec.encode(k, v), torch.float64)
    measured = torch.linalg.vector_norm(
        reference_decode_attention(q, kd, v) - reference_decode_attention(q, k, v), dim=-1
    )
    dist = codec.predicted_key_distortion()
    assert dist is not None
    predicted = predict_key_drift(q, k, v, dist)
    ratio = float(measured.norm() / predicted.norm())
    assert ratio == pytest.approx(1.0, abs=0.2)


# Cosine floors and relative-L2 ceilings of the full path (K and V quantized), Gaussian q, k, v,
# logit std 1. Measured (8 heads, T = 128 / 2,048 / 8,192): min cosine 0.994 / 0.988 /
# 0.975 / 0.953 and rel. L2 ≤ 0.10 / 0.14 / 0.23 / 0.29 for k8v4 / 4bit / k3v4 / 3bit.
FULL_PATH_BOUNDS = {
    "turboquant_k8v4": (0.985, 0.13),
    "turboquant_4bit_nc": (0.98, 0.17),
    "turboquant_k3v4_nc": (0.96, 0.26),
    "turboquant_3bit_nc": (0.94, 0.33),
}


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("tokens", [128, 2048, 8192])
def test_full_path_error_across_context_lengths(name: str, tokens: int) -> None:
    codec = KVCodec.build(name, D)
    k = gaussian(1, 2, tokens, D, seed=10 + tokens)
    v = gaussian(1, 2, tokens, D, seed=11 + tokens)
    q = gaussian(1, 8, D, seed=12 + tokens)
    exact = reference_decode_attention(q, k, v)
    approx = unfused_decode_attention(q, codec.encode(k, v), codec)
    floor, ceiling = FULL_PATH_BOUNDS[name]
    assert float(cosine(approx, exact).min()) > floor
    assert float((approx - exact).norm() / exact.norm()) < ceiling


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_single_token_round_trip(name: str) -> None:
    """vLLM's check: one token, query = key: out = ṽ; per-head cosine(out, V) > 0.95 / 0.85."""
    codec = KVCodec.build(name, D)
    k = gaussian(1, 4, 1, D, seed=20)
    v = gaussian(1, 4, 1, D, seed=21)
    out = unfused_decode_attention(k[:, :, 0, :].clone(), codec.encode(k, v), codec)
    floor = 0.95 if name == "turboquant_k8v4" else 0.85
    assert float(cosine(out, v[:, :, 0, :]).min()) > floor


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_peaked_attention_finds_its_token(name: str) -> None:
    """A query aimed at token j among 512: output ≈ v_j, so keys must keep their ranking."""
    codec = KVCodec.build(name, D)
    k = gaussian(1, 2, 512, D, seed=30)
    v = gaussian(1, 2, 512, D, seed=31)
    targets = [7, 300]
    # logit of j ≈ 3·‖k_j‖²/√d ≈ 34, others ≈ N(0, 3²): j holds nearly all the weight
    q = torch.stack([3.0 * k[0, h, j] for h, j in enumerate(targets)])[None]
    out = unfused_decode_attention(q, codec.encode(k, v), codec)
    for h, j in enumerate(targets):
        assert float(cosine(out[0, h], v[0, h, j])) > (0.95 if name == "turboquant_k8v4" else 0.85)


def test_seq_lens_ignore_the_tail() -> None:
    codec = KVCodec.build("turboquant_4bit_nc", D)
    k = gaussian(2, 2, 40, D, seed=40)
    v = gaussian(2, 2, 40, D, seed=41)
    q = gaussian(2, 4, D, seed=42)
    cache = codec.encode(k, v)
    lens = torch.tensor([40, 13], dtype=torch.int32)
    full = unfused_decode_attention(q, cache, codec, seq_lens=lens)
    short = unfused_decode_attention(q[1:], codec.encode(k[1:, :, :13], v[1:, :, :13]), codec)
    torch.testing.assert_close(full[1:], short, atol=1e-12, rtol=0)
    with pytest.raises(KernelInputError, match="seq_lens"):
        unfused_decode_attention(q, cache, codec, seq_lens=torch.tensor([40, 41]))


def test_reference_attention_refuses_bad_shapes() -> None:
    k = torch.zeros(1, 3, 4, D)
    with pytest.raises(KernelInputError, match="not a multiple of 3 KV heads"):
        reference_decode_attention(torch.zeros(1, 4, D), k, k)
    with pytest.raises(KernelInputError, match="head size 64 differs"):
        reference_decode_attention(torch.zeros(1, 3, 64), k, k)
    with pytest.raises(KernelInputError, match="batch 2 differs"):
        reference_decode_attention(torch.zeros(2, 3, D), k, k)
