"""The float64 reference against explicit per-query loops and the conventions it encodes."""

from __future__ import annotations

import math

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels.reference import reference_attention

pytestmark = pytest.mark.kernels

# Two float64 computations of the same sums in a different order: rounding ~1e-15 relative.
F64_TOL = 1e-12


def _loop_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: list[list[int]],
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query and head, attention over the listed key positions, from the definition."""
    t_len, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(t_len, hq, d, dtype=torch.float64)
    lse = torch.full((t_len, hq), -math.inf, dtype=torch.float64)
    for t in range(t_len):
        keys = visible[t]
        if not keys:
            continue
        for h in range(hq):
            kv = h // group
            s = torch.stack([(q[t, h].double() * scale) @ k[j, kv].double() for j in keys])
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            m = s.max()
            lse[t, h] = m + torch.log(torch.exp(s - m).sum())
            p = torch.exp(s - lse[t, h])
            out[t, h] = sum(p[i] * v[j, kv].double() for i, j in enumerate(keys))
    return out, lse


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    ("t_len", "s_len", "hkv", "group", "causal", "window", "softcap"),
    [
        (1, 9, 1, 1, True, None, None),  # decode
        (4, 11, 2, 3, True, None, None),  # odd GQA ratio, query block after a prefix
        (5, 5, 1, 4, True, None, None),  # square: the usual lower triangle
        (3, 8, 2, 2, False, None, None),  # non-causal (prefix chunks)
        (6, 13, 1, 2, True, 4, None),  # sliding window
        (2, 7, 2, 1, True, None, 5.0),  # soft-cap
        (3, 10, 1, 2, False, 3, 30.0),  # window without causal: only old keys drop out
    ],
)
def test_matches_definition(
    torch_gen: torch.Generator,
    t_len: int,
    s_len: int,
    hkv: int,
    group: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> None:
    d = 16
    q, k, v = (
        _rand(torch_gen, t_len, hkv * group, d),
        _rand(torch_gen, s_len, hkv, d),
        _rand(torch_gen, s_len, hkv, d),
    )
    scale = 0.3
    q_start = s_len - t_len
    visible = []
    for t in range(t_len):
        p = q_start + t
        visible.append(
            [
                j
                for j in range(s_len)
                if (not causal or j <= p) and (window is None or p - j < window)
            ]
        )
    want_out, want_lse = _loop_attention(q, k, v, visible, scale, softcap)
    out, lse = reference_attention(
        q, k, v, scale=scale, causal=causal, window=window, softcap=softcap
    )
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert lse.shape == (t_len, hkv * group)
    torch.testing.assert_close(out, want_out, rtol=0, atol=F64_TOL)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=F64_TOL)


def test_causal_is_bottom_right_not_top_left(torch_gen: torch.Generator) -> None:
    # 2 queries after a 6-token prefix: query 0 sits at position 6 and sees keys 0..6.
    q, k, v = _rand(torch_gen, 2, 1, 8), _rand(torch_gen, 8, 1, 8), _rand(torch_gen, 8, 1, 8)
    out, _ = reference_attention(q, k, v, causal=True)
    _, lse7 = reference_attention(q[:1], k[:7], v[:7], causal=False)
    _, lse_full = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(lse_full[0], lse7[0], rtol=0, atol=F64_TOL)
    # torch SDPA's is_causal aligns top-left: query 0 would see key 0 only. Different.
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    assert not torch.allclose(sdpa, out, atol=1e-6)
    top_left, _ = reference_attention(q, k, v, causal=True, q_start=0)
    torch.testing.assert_close(top_left, sdpa, rtol=0, atol=1e-10)


def test_lse_is_natural_log_with_scale(torch_gen: torch.Generator) -> None:
    # Identical keys: every score is s, so lse = s + ln S exactly.
    d, s_len = 8, 37
    q = _rand(torch_gen, 1, 2, d)
    k = _rand(torch_gen, 1, 1, d).expand(s_len, 1, d).contiguous()
    v = _rand(torch_gen, s_len, 1, d)
    out, lse = reference_attention(q, k, v, scale=0.5)
    s = (q[0] * 0.5) @ k[0, 0]
    torch.testing.assert_close(lse[0], s + math.log(s_len), rtol=0, atol=F64_TOL)
    torch.testing.assert_close(out[0], v[:, 0].mean(0).expand(2, d), rtol=0, atol=F64_TOL)


def test_gqa_equals_repeated_heads(torch_gen: torch.Generator) -> None:
    q, k, v = _rand(torch_gen, 3, 8, 16), _rand(torch_gen, 10, 2, 16), _rand(torch_gen, 10, 2, 16)
    out, lse = reference_attention(q, k, v, causal=True)
    out_mha, lse_mha = reference_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=True
    )
    torch.testing.assert_close(out, out_mha, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_mha, rtol=0, atol=0)


def test_query_seeing_nothing_gets_zero_and_neg_inf(torch_gen: torch.Generator) -> None:
    # 4 queries over 2 keys, bottom-right: queries 0 and 1 sit at positions -2 and -1.
    q, k, v = _rand(torch_gen, 4, 1, 8), _rand(torch_gen, 2, 1, 8), _rand(torch_gen, 2, 1, 8)
    out, lse = reference_attention(q, k, v, causal=True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2:]).all()
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_flavour_is_close_and_typed(
    torch_gen: torch.Generator, dtype: torch.dtype
) -> None:
    q, k, v = (
        torch.randn(*s, generator=torch_gen).to(dtype)
        for s in ((3, 4, 32), (40, 2, 32), (40, 2, 32))
    )
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    low, low_lse = reference_attention(q, k, v, causal=True, upcast=False)
    assert low.dtype == dtype and low_lse.dtype == torch.float32
    # Scores in the storage dtype carry its rounding: ~8 ulps of an O(1) output is ample.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(low.double(), ref, rtol=0, atol=8 * eps * 4)
    torch.testing.assert_close(low_lse.double(), ref_lse, rtol=0, atol=64 * eps)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("query_2d", "query must be 3-D"),
        ("heads", r"query heads \(6\) must be a multiple of key/value heads \(4\)"),
        ("dtype", "key must have the dtype of query"),
        ("kv_shape", "key and value must have the same shape"),
        ("head_size", "key head size must equal query head size"),
        ("window", "window must be None or an int >= 1"),
        ("softcap", "softcap must be None or > 0"),
    ],
)
def test_bad_input(case: str, match: str) -> None:
    q, k, v = torch.zeros(2, 4, 8), torch.zeros(5, 2, 8), torch.zeros(5, 2, 8)
    kwargs: dict[str, object] = {}
    if case == "query_2d":
        q = q[0]
    elif case == "heads":
        q, k, v = torch.zeros(2, 6, 8), torch.zeros(5, 4, 8), torch.zeros(5, 4, 8)
    elif case == "dtype":
        k = k.half()
    elif case == "kv_shape":
        v = v[:4]
    elif case == "head_size":
        k, v = torch.zeros(5, 2, 4), torch.zeros(5, 2, 4)
    elif case == "window":
        kwargs["window"] = 0
    elif case == "softcap":
        kwargs["softcap"] = -1.0
    with pytest.raises(KernelInputError, match=match) as info:
        reference_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
