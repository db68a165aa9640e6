"""LSE merge: exactness against attention over the union, conventions and edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels.merge import (
    LN2,
    empty_lse_to_neg_inf,
    lse_from_base2,
    lse_to_base2,
    merge_many,
    merge_states,
)
from servelab.kernels.reference import reference_attention
from servelab.kernels.tolerance import check_attention, diagnose_lse

pytestmark = pytest.mark.kernels

# float32 merge of float32 partials: a few ulps of O(1) values (lab probe: 1e-5).
F32_TOL = 1e-5
# float64 throughout: rounding only.
F64_TOL = 1e-12


def _split_reference(
    gen: torch.Generator,
    bounds: list[int],
    t_len: int = 3,
    hq: int = 4,
    hkv: int = 2,
    d: int = 32,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Partial states over key ranges [bounds[i], bounds[i+1]) and the state over all keys."""
    s_len = bounds[-1]
    q = torch.randn(t_len, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(s_len, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(s_len, hkv, d, generator=gen, dtype=torch.float64)
    parts = [
        reference_attention(q, k[a:b], v[a:b], causal=False) for a, b in itertools.pairwise(bounds)
    ]
    return parts, reference_attention(q, k, v, causal=False)


def test_two_way_merge_equals_union(torch_gen: torch.Generator, device: torch.device) -> None:
    parts, (ref, ref_lse) = _split_reference(torch_gen, [0, 23, 61])
    (oa, la), (ob, lb) = ((o.to(device), lz.to(device)) for o, lz in parts)
    out, lse = merge_states(oa, la, ob, lb)
    assert out.dtype == torch.float64  # float64 inputs stay float64
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=F64_TOL)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=F64_TOL)
    out32, lse32 = merge_states(oa.float(), la.float(), ob.float(), lb.float())
    assert out32.dtype == torch.float32 and lse32.dtype == torch.float32
    torch.testing.assert_close(out32.cpu().double(), ref, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(lse32.cpu().double(), ref_lse, rtol=0, atol=F32_TOL)


def test_many_way_merge_is_order_independent(
    torch_gen: torch.Generator, device: torch.device
) -> None:
    bounds = [0, 7, 19, 20, 48, 77, 100]
    parts, (ref, ref_lse) = _split_reference(torch_gen, bounds)
    outs = torch.stack([o for o, _ in parts]).float().to(device)
    lses = torch.stack([lz for _, lz in parts]).float().to(device)
    out, lse = merge_many(outs, lses)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=0, atol=F32_TOL)
    perm = torch.randperm(len(parts), generator=torch_gen).to(device)
    out_p, lse_p = merge_many(outs[perm], lses[perm])
    torch.testing.assert_close(out_p, out, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(lse_p, lse, rtol=0, atol=F32_TOL)
    # Folding one at a time in reverse order lands on the same state.
    acc_o, acc_l = outs[-1], lses[-1]
    for i in range(len(parts) - 2, -1, -1):
        acc_o, acc_l = merge_states(acc_o, acc_l, outs[i], lses[i])
    torch.testing.assert_close(acc_o, out, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(acc_l, lse, rtol=0, atol=F32_TOL)


def test_empty_sides(torch_gen: torch.Generator, device: torch.device) -> None:
    o = torch.randn(5, 4, 16, generator=torch_gen).to(device)
    lse = torch.randn(5, 4, generator=torch_gen).to(device)
    zero = torch.zeros_like(o)
    neg = torch.full_like(lse, -math.inf)
    # One side empty: the other comes back exactly (weights 1 and 0).
    out, lz = merge_states(o, lse, zero, neg)
    assert torch.equal(out, o) and torch.equal(lz, lse)
    out, lz = merge_states(zero, neg, o, lse)
    assert torch.equal(out, o) and torch.equal(lz, lse)
    # Both empty: 0 and -inf, never NaN.
    out, lz = merge_states(zero, neg, zero, neg)
    assert torch.equal(out, zero) and torch.isneginf(lz).all()
    out, lz = merge_many(torch.stack([zero, zero, zero]), torch.stack([neg, neg, neg]))
    assert torch.equal(out, zero) and torch.isneginf(lz).all()
    out, lz = merge_many(
        torch.zeros(0, 5, 4, 16, device=device), torch.zeros(0, 5, 4, device=device)
    )
    assert torch.equal(out, zero) and torch.isneginf(lz).all()


def test_mixed_empty_rows(torch_gen: torch.Generator, device: torch.device) -> None:
    # Per row: a only, b only, both, neither.
    oa = torch.randn(4, 1, 8, generator=torch_gen).to(device)
    ob = torch.randn(4, 1, 8, generator=torch_gen).to(device)
    la = torch.tensor([[0.3], [-math.inf], [1.0], [-math.inf]], device=device)
    lb = torch.tensor([[-math.inf], [2.0], [1.0], [-math.inf]], device=device)
    oa[1] = 0
    oa[3] = 0
    ob[0] = 0
    ob[3] = 0
    out, lse = merge_states(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0], oa[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], ob[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], (oa[2] + ob[2]) / 2, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(lse[2, 0].item(), 1.0 + LN2, rtol=0, atol=F32_TOL)
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.isneginf(lse[3]).all()


def test_plus_inf_means_empty(torch_gen: torch.Generator, device: torch.device) -> None:
    """FA2 writes +inf for an empty set; merging must read it as -inf (vLLM maps it)."""
    o = torch.randn(6, 2, 8, generator=torch_gen).to(device)
    lse = torch.randn(6, 2, generator=torch_gen).to(device)
    pos = torch.full_like(lse, math.inf)
    out, lz = merge_states(o, lse, torch.zeros_like(o), pos)
    assert torch.equal(out, o) and torch.equal(lz, lse)
    # About 10% of each side's rows +inf, never both (vLLM's test pattern).
    la = lse.clone()
    lb = torch.randn(6, 2, generator=torch_gen).to(device)
    la[0] = math.inf
    lb[3] = math.inf
    ob = torch.randn(6, 2, 8, generator=torch_gen).to(device)
    out, lz = merge_states(o, la, ob, lb)
    torch.testing.assert_close(out[0], ob[0], rtol=0, atol=0)
    torch.testing.assert_close(out[3], o[3], rtol=0, atol=0)
    assert torch.isfinite(lz).all()
    assert torch.isneginf(empty_lse_to_neg_inf(pos)).all()


@pytest.mark.parametrize("offset", [80.0, -80.0, 500.0])
def test_large_lse_offsets_do_not_overflow(
    torch_gen: torch.Generator, device: torch.device, offset: float
) -> None:
    # exp(lse) overflows float32 above ~88.7: the merge must only see differences.
    o = torch.randn(2, 3, 4, 8, generator=torch_gen, dtype=torch.float64)
    base = torch.randn(2, 3, 4, generator=torch_gen, dtype=torch.float64)
    # Round to the kernel's float32 first, so the reference sees the same inputs.
    lses = (base + torch.tensor([offset, offset + 1.5]).view(2, 1, 1).double()).float().double()
    o = o.float().double()
    w = torch.softmax(lses, dim=0)
    want_o = (w.unsqueeze(-1) * o).sum(0)
    want_l = torch.logsumexp(lses, dim=0)
    out, lse = merge_states(
        o[0].float().to(device),
        lses[0].float().to(device),
        o[1].float().to(device),
        lses[1].float().to(device),
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.cpu().double(), want_o, rtol=0, atol=F32_TOL)
    # float32 LSE near 500 has an ulp of 3e-5: compare relatively there.
    torch.testing.assert_close(lse.cpu().double(), want_l, rtol=2e-7, atol=F32_TOL)


def test_base2_conversion(torch_gen: torch.Generator, device: torch.device) -> None:
    parts, (ref, ref_lse) = _split_reference(torch_gen, [0, 30, 64])
    (oa, la), (ob, lb) = parts
    # A FlashInfer-style producer hands over base-2 LSEs.
    la2, lb2 = lse_to_base2(la), lse_to_base2(lb)
    out, lse = merge_states(oa, lse_from_base2(la2), ob, lse_from_base2(lb2))
    torch.testing.assert_close(out, ref, rtol=0, atol=F64_TOL)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=F64_TOL)
    # A base-2 LSE read as natural log is off by the factor 1/ln 2 = 1.4427, and merging
    # unconverted values gives a wrong LSE too (and wrong weights).
    assert "base-2" in diagnose_lse(la2, la)
    _, wrong = merge_states(oa, la2, ob, lb2)
    assert float((wrong - ref_lse).abs().min()) > 0.5
    assert float(lse_from_base2(torch.tensor(1.0))) == pytest.approx(LN2, abs=1e-7)


def test_chunk_counted_twice_is_detected(torch_gen: torch.Generator) -> None:
    """A duplicated chunk among equal-mass chunks shifts LSE by exactly ln 2."""
    parts, (ref, ref_lse) = _split_reference(torch_gen, [0, 40])
    (o, lz) = parts[0]
    dup_o, dup_l = merge_states(o.float(), lz.float(), o.float(), lz.float())
    torch.testing.assert_close(dup_o.double(), ref, rtol=0, atol=F32_TOL)  # output unchanged
    torch.testing.assert_close(
        (dup_l.double() - ref_lse), torch.full_like(ref_lse, LN2), rtol=0, atol=F32_TOL
    )
    report = check_attention(dup_o, ref, ref, dtype=torch.float32, lse=dup_l, lse_ref=ref_lse)
    assert not report.ok
    assert any("ln 2" in f for f in report.failures), report.explain()


def test_low_precision_partials_accumulate_in_fp32(torch_gen: torch.Generator) -> None:
    parts, (ref, _) = _split_reference(torch_gen, [0, 50, 90])
    (oa, la), (ob, lb) = parts
    out, lse = merge_states(oa.bfloat16(), la.float(), ob.bfloat16(), lb.float())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    cast, _ = merge_states(
        oa.bfloat16(), la.float(), ob.bfloat16(), lb.float(), out_dtype=torch.bfloat16
    )
    assert cast.dtype == torch.bfloat16
    # Inputs rounded to bf16 (rel. 2^-9) are the only error source.
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("lse_shape", r"state b lse must have shape out.shape\[:-1\]"),
        ("out_shape", "merge_states needs outputs of one shape"),
        ("lse_dtype", "state a lse must have dtype in"),
        ("not_tensor", "state a output must be a torch.Tensor"),
    ],
)
def test_bad_input(case: str, match: str) -> None:
    oa, la = torch.zeros(3, 2, 4), torch.zeros(3, 2)
    ob, lb = torch.zeros(3, 2, 4), torch.zeros(3, 2)
    if case == "lse_shape":
        lb = torch.zeros(2, 3)
    elif case == "out_shape":
        ob, lb = torch.zeros(3, 3, 4), torch.zeros(3, 3)
    elif case == "lse_dtype":
        la = la.half()
    elif case == "not_tensor":
        oa = [[0.0]]  # type: ignore[assignment]
    with pytest.raises(KernelInputError, match=match):
        merge_states(oa, la, ob, lb)


def test_merge_many_rejects_empty_list() -> None:
    with pytest.raises(KernelInputError, match="empty list"):
        merge_many([], [])
