"""Reference attention: the ground truth every kernel test compares against.

Layout follows vLLM: query ``[T, Hq, D]``, keys and values ``[S, Hkv, D]``, output
``[T, Hq, D]``. The LSE is natural-log, one per query head, shaped ``[T, Hq]`` (vLLM's
``merge_attn_states`` uses ``[Hq, T]``: transpose at that boundary).

Positions: key ``j`` sits at position ``j``; query ``i`` at ``q_start + i``. The default
``q_start = S - T`` aligns the queries bottom-right, as FlashAttention >= 2.1 and vLLM do
(torch SDPA's ``is_causal=True`` aligns top-left, which is wrong for a query block that
follows a prefix). A query at position ``p`` sees key ``j`` when ``j <= p`` (causal) and
``p - j < window`` (sliding window, if given). A query that sees no key gets output 0 and
LSE -inf.
"""

from __future__ import annotations

import math

import torch

from servelab.errors import KernelInputError
from servelab.kernels.validation import (
    FLOAT_DTYPES,
    describe,
    require_dtype,
    require_ndim,
    require_optional_positive,
    require_same_dtype,
    require_tensor,
)


def visibility_mask(
    num_queries: int,
    num_keys: int,
    *,
    q_start: int,
    k_start: int = 0,
    causal: bool,
    window: int | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Boolean ``[T, S]`` mask (True = visible) for queries at ``q_start..`` over keys at
    ``k_start..``; ``None`` when every key is visible to every query."""
    q_first, q_last = q_start, q_start + num_queries - 1
    k_first, k_last = k_start, k_start + num_keys - 1
    needs_causal = causal and k_last > q_first
    needs_window = window is not None and q_last - k_first >= window
    if not (needs_causal or needs_window):
        return None
    qpos = torch.arange(q_first, q_last + 1, device=device).unsqueeze(1)
    kpos = torch.arange(k_first, k_last + 1, device=device).unsqueeze(0)
    visible = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    if needs_causal:
        visible &= kpos <= qpos
    if window is not None and needs_window:
        visible &= (qpos - kpos) < window
    return visible


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    q_start: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over ``key``/``value`` with grouped-query heads.

    ``upcast=True`` (the ground truth) computes everything in float64 and returns float64.
    ``upcast=False`` is "the same reference in the test dtype" of the FlashAttention error
    rule: scores in the input dtype, softmax in float32, probabilities cast to the value
    dtype before P·V, output in the input dtype; its LSE is float32.

    >>> q = torch.zeros(1, 2, 4); k = torch.zeros(3, 1, 4); v = torch.ones(3, 1, 4)
    >>> out, lse = reference_attention(q, k, v)
    >>> out.shape, round(float(lse[0, 0]), 6) == round(math.log(3), 6)
    (torch.Size([1, 2, 4]), True)
    """
    query = require_tensor("query", query)
    key = require_tensor("key", key)
    value = require_tensor("value", value)
    require_ndim("query", query, 3, "[T, Hq, D]")
    require_ndim("key", key, 3, "[S, Hkv, D]")
    require_ndim("value", value, 3, "[S, Hkv, D]")
    require_dtype("query", query, FLOAT_DTYPES)
    require_same_dtype("key", key, "query", query)
    require_same_dtype("value", value, "query", query)
    if key.shape != value.shape:
        raise KernelInputError(
            f"key and value must have the same shape [S, Hkv, D]; got key {describe(key)}, "
            f"value {describe(value)}"
        )
    num_q, num_heads, head_size = query.shape
    num_k, num_kv_heads, _ = key.shape
    if key.shape[2] != head_size:
        raise KernelInputError(
            f"key head size must equal query head size {head_size}; got {describe(key)}"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise KernelInputError(
            f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})"
        )
    require_optional_positive("scale", scale)
    require_optional_positive("softcap", softcap)
    if window is not None and (isinstance(window, bool) or window < 1):
        raise KernelInputError(f"window must be None or an int >= 1, got {window!r}")
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_size) if scale is None else scale
    q_start = num_k - num_q if q_start is None else q_start

    work = torch.float64 if upcast else query.dtype
    q = query.detach().to(work)
    k = key.detach().to(work).repeat_interleave(group, dim=1)
    v = value.detach().to(work).repeat_interleave(group, dim=1)
    # [Hq, T, S]; the query is scaled before the product, as the kernels do.
    scores = torch.einsum("thd,shd->hts", q * scale, k)
    soft = torch.float64 if upcast else torch.float32
    scores = scores.to(soft)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visibility_mask(
        num_q, num_k, q_start=q_start, causal=causal, window=window, device=query.device
    )
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, T], -inf where nothing is visible
    finite = torch.isfinite(lse)
    probs = torch.where(
        finite.unsqueeze(-1), torch.exp(scores - lse.unsqueeze(-1)), torch.zeros_like(scores)
    )
    out = torch.einsum("hts,shd->thd", probs.to(v.dtype), v)
    return out, lse.transpose(0, 1).contiguous()
