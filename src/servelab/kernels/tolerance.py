"""The attention error rule (docs/kernels-paged.md §1.5), as a verdict record.

Primary rule (FlashAttention's ``tests/test_flash_attn.py``): with ``ref`` the float64
reference and ``ref_lowp`` the same reference run in the test dtype,

    max|out - ref|  <= 2 * max|ref_lowp - ref| + 1e-5
    mean|out - ref| <= 1.5 * mean|ref_lowp - ref|

Fixed backstops (vLLM's merge values): elementwise ``|out - ref| <= atol + rtol*|ref|`` with
fp16 atol = rtol = 1e-3; bf16 atol 1e-3, rtol 1e-2; fp32 1e-5 (the lab's CPU probe); LSE
atol 1e-3 (1e-5 for fp32). Both the primary rule and the backstop must hold. For float32
the low-precision reference is as accurate as the kernel, so the ratio tests would compare
two rounding noises; there the mean rule gets the same 1e-5-scale slack the max rule has
(``FP32_MEAN_SLACK``).

An LSE error reads like a diagnosis: an additive ln k (0.693 for k = 2) means a chunk
counted twice or dropped; a ratio of 1.4427 or 0.6931 means a base-2/natural-log mix-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BACKSTOP: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-3, 1e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}
LSE_ATOL: dict[torch.dtype, float] = {
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
    torch.float32: 1e-5,
    torch.float64: 1e-10,
}
MAX_SLACK = 1e-5
FP32_MEAN_SLACK = 1e-6


@dataclass(frozen=True)
class ErrorReport:
    """Measured errors against the float64 reference and whether they pass."""

    dtype: str
    max_err: float
    mean_err: float
    max_err_lowp: float
    mean_err_lowp: float
    backstop_excess: float  # max of |out-ref| - (atol + rtol|ref|); <= 0 passes
    lse_max_err: float | None
    nan_count: int
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def explain(self) -> str:
        head = (
            f"[{self.dtype}] max {self.max_err:.3e} (lowp ref {self.max_err_lowp:.3e}), "
            f"mean {self.mean_err:.3e} (lowp ref {self.mean_err_lowp:.3e})"
        )
        if self.lse_max_err is not None:
            head += f", lse max {self.lse_max_err:.3e}"
        return head + ("" if self.ok else "; FAILED: " + "; ".join(self.failures))


def diagnose_lse(lse: torch.Tensor, lse_ref: torch.Tensor) -> str:
    """Name the likely cause of an LSE mismatch (additive ln k or a base mix-up)."""
    both = torch.isfinite(lse_ref) & torch.isfinite(lse)
    if not bool(both.any()):
        return "no finite LSE pairs to compare"
    diff = (lse.double() - lse_ref.double())[both]
    med = float(diff.median())
    for k in range(2, 9):
        if abs(abs(med) - math.log(k)) < 1e-3:
            sign = "extra" if med > 0 else "missing"
            return f"LSE shifted by {med:+.5f} = ±ln {k}: a chunk counted twice or {sign} mass"
    nonzero = lse_ref[both].abs() > 1e-3
    if bool(nonzero.any()):
        ratio = float((lse.double()[both][nonzero] / lse_ref.double()[both][nonzero]).median())
        if abs(ratio - 1 / math.log(2)) < 1e-3 or abs(ratio - math.log(2)) < 1e-3:
            return f"LSE ratio {ratio:.5f}: base-2 vs natural-log mix-up"
    return f"median LSE difference {med:+.3e}"


def check_attention(
    out: torch.Tensor,
    ref: torch.Tensor,
    ref_lowp: torch.Tensor,
    *,
    dtype: torch.dtype,
    lse: torch.Tensor | None = None,
    lse_ref: torch.Tensor | None = None,
) -> ErrorReport:
    """Apply the rule; ``dtype`` is the test dtype (the inputs' storage dtype)."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    lp = ref_lowp.detach().to("cpu", torch.float64)
    failures: list[str] = []
    nan_count = int(torch.isnan(o).sum())
    if nan_count:
        failures.append(f"{nan_count} NaN in the output (unwritten or invalid)")
    err = (o - r).abs()
    err_lp = (lp - r).abs()
    n = max(1, err.numel())
    max_err = float(err.max()) if err.numel() else 0.0
    mean_err = float(err.sum()) / n
    max_lp = float(err_lp.max()) if err_lp.numel() else 0.0
    mean_lp = float(err_lp.sum()) / n
    if not max_err <= 2 * max_lp + MAX_SLACK:
        failures.append(f"max error {max_err:.3e} > 2 x {max_lp:.3e} + {MAX_SLACK:g}")
    mean_slack = FP32_MEAN_SLACK if dtype in (torch.float32, torch.float64) else 0.0
    if not mean_err <= 1.5 * mean_lp + mean_slack:
        failures.append(f"mean error {mean_err:.3e} > 1.5 x {mean_lp:.3e} + {mean_slack:g}")
    atol, rtol = BACKSTOP[dtype]
    excess = float((err - (atol + rtol * r.abs())).max()) if err.numel() else -math.inf
    if not excess <= 0:
        failures.append(f"backstop atol {atol:g} rtol {rtol:g} exceeded by {excess:.3e}")
    lse_max: float | None = None
    if lse is not None and lse_ref is not None:
        a = lse.detach().to("cpu", torch.float64)
        b = lse_ref.detach().to("cpu", torch.float64)
        same_inf = (a == b) & torch.isinf(b)
        d = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
        d = torch.nan_to_num(d, nan=math.inf)
        lse_max = float(d.max()) if d.numel() else 0.0
        if not lse_max <= LSE_ATOL[dtype]:
            failures.append(
                f"LSE max error {lse_max:.3e} > {LSE_ATOL[dtype]:g} ({diagnose_lse(a, b)})"
            )
    return ErrorReport(
        dtype=str(dtype).removeprefix("torch."),
        max_err=max_err,
        mean_err=mean_err,
        max_err_lowp=max_lp,
        mean_err_lowp=mean_lp,
        backstop_excess=excess,
        lse_max_err=lse_max,
        nan_count=nan_count,
        failures=tuple(failures),
    )
