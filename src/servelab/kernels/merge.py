"""Merging partial attention states (output, LSE) over disjoint key sets.

For partial states ``(o_j, lse_j)`` (natural-log LSE, one per query head):

    M = max_j lse_j,  lse = M + ln sum_j exp(lse_j - M),  o = sum_j exp(lse_j - lse) * o_j

Weights are computed first and outputs scaled afterwards, always relative to ``M``, so
nothing overflows (exp overflows float32 above ~88.7). Accumulation is float32; cast once
at the very end. When every part is empty (``M = -inf``) the result is output 0 and LSE
-inf, never NaN (the vLLM and FlashInfer formulas give NaN there).

Shapes: an output is ``[..., H, D]`` and its LSE ``[..., H]`` (``lse.shape ==
out.shape[:-1]``). vLLM keeps LSE as ``[H, T]`` and FlashInfer in base 2: convert at the
boundary with :func:`lse_from_base2` and a transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from servelab.errors import KernelInputError
from servelab.kernels.validation import (
    FLOAT_DTYPES,
    describe,
    require_dtype,
    require_tensor,
    same_device,
)

LN2 = math.log(2.0)


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Base-2 LSE (FlashInfer ``merge_state``, ``return_lse``) to natural log: ``lse2 * ln 2``.

    >>> lse_from_base2(torch.tensor([1.0], dtype=torch.float64)).item() == math.log(2.0)
    True
    """
    return lse2 * LN2


def lse_to_base2(lse: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE to base 2: ``lse / ln 2``."""
    return lse / LN2


def empty_lse_to_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    """Map the FA2 convention for an empty key set (+inf) to the one merges use (-inf).

    A real LSE is finite, so every +inf can only mean "no keys".

    >>> empty_lse_to_neg_inf(torch.tensor([math.inf, 0.5])).tolist()
    [-inf, 0.5]
    """
    return torch.where(lse == math.inf, torch.full_like(lse, -math.inf), lse)


def _check_state(name: str, out: torch.Tensor, lse: torch.Tensor) -> None:
    require_tensor(f"{name} output", out)
    require_tensor(f"{name} lse", lse)
    require_dtype(f"{name} output", out, FLOAT_DTYPES)
    require_dtype(f"{name} lse", lse, (torch.float32, torch.float64))
    if out.dim() < 2 or tuple(lse.shape) != tuple(out.shape[:-1]):
        raise KernelInputError(
            f"{name} lse must have shape out.shape[:-1] ([..., H] for output [..., H, D]); "
            f"got output {describe(out)}, lse {describe(lse)}"
        )
    if not same_device(out.device, lse.device):
        raise KernelInputError(
            f"{name} output and lse must be on one device; got {out.device} and {lse.device}"
        )


def merge_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial states over disjoint key sets; returns ``(out, lse)``.

    +inf in an input LSE is read as an empty set. The output is float32 unless
    ``out_dtype`` says otherwise (float64 inputs stay float64); the LSE is float32 (float64
    for float64 inputs).

    >>> o, l = merge_states(torch.ones(1, 1, 2), torch.zeros(1, 1),
    ...                     torch.zeros(1, 1, 2), torch.full((1, 1), -math.inf))
    >>> o.tolist(), l.tolist()
    ([[[1.0, 1.0]]], [[0.0]])
    """
    _check_state("state a", out_a, lse_a)
    _check_state("state b", out_b, lse_b)
    if out_a.shape != out_b.shape:
        raise KernelInputError(
            f"merge_states needs outputs of one shape; got a {describe(out_a)}, b {describe(out_b)}"
        )
    if not same_device(out_a.device, out_b.device):
        raise KernelInputError(
            f"merge_states needs both states on one device; got {out_a.device} and {out_b.device}"
        )
    acc = torch.float64 if torch.float64 in (out_a.dtype, lse_a.dtype) else torch.float32
    la = empty_lse_to_neg_inf(lse_a.to(acc))
    lb = empty_lse_to_neg_inf(lse_b.to(acc))
    m = torch.maximum(la, lb)
    # Both empty: shift by 0 so the weights are exp(-inf) = 0 instead of exp(NaN).
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(la - m_safe)
    wb = torch.exp(lb - m_safe)
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))
    ca = (wa / denom).unsqueeze(-1)
    cb = (wb / denom).unsqueeze(-1)
    out = ca * out_a.to(acc) + cb * out_b.to(acc)
    lse = m_safe + torch.log(total)
    return out.to(out_dtype or acc), lse


def merge_many(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial states at once: ``outs`` ``[N, ..., H, D]``, ``lses`` ``[N, ..., H]``.

    Zero parts give output 0 and LSE -inf when given as stacked tensors with N = 0.
    """
    out_stack = outs if isinstance(outs, torch.Tensor) else _stack("outs", outs)
    lse_stack = lses if isinstance(lses, torch.Tensor) else _stack("lses", lses)
    _check_state("stacked", out_stack, lse_stack)
    if out_stack.dim() < 3:
        raise KernelInputError(
            f"merge_many needs outs [N, ..., H, D] (at least 3-D); got {describe(out_stack)}"
        )
    acc = torch.float64 if torch.float64 in (out_stack.dtype, lse_stack.dtype) else torch.float32
    lse_all = empty_lse_to_neg_inf(lse_stack.to(acc))
    if lse_all.shape[0] == 0:
        zero = torch.zeros(out_stack.shape[1:], dtype=out_dtype or acc, device=out_stack.device)
        return zero, torch.full(lse_all.shape[1:], -math.inf, dtype=acc, device=lse_all.device)
    m = lse_all.amax(dim=0)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    weights = torch.exp(lse_all - m_safe)
    total = weights.sum(dim=0)
    denom = torch.where(total > 0, total, torch.ones_like(total))
    coeff = (weights / denom).unsqueeze(-1)
    out = (coeff * out_stack.to(acc)).sum(dim=0)
    return out.to(out_dtype or acc), m_safe + torch.log(total)


def _stack(name: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 0:
        raise KernelInputError(
            f"merge_many got an empty list for {name}; pass stacked tensors with N = 0 "
            "to merge nothing"
        )
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise KernelInputError(f"merge_many needs {name} of one shape; got {sorted(shapes)}")
    return torch.stack(list(parts))
