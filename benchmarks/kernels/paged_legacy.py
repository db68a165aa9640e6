"""The previous per-chunk attention step (keys and values upcast to float32), kept only so
``paged_bench.py --compare`` can time it beside the current one in the same run.

Same head-major running state, soft-cap, mask and softmax as
:mod:`servelab.kernels.attention` (shared from there); only the query preparation and the
per-part products differ. Not used by the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelab.kernels.attention import (
    State,
    chunk_fully_masked,
    merge_into,
    unnormalized_probabilities,
)

_SCORE_TILE_BYTES = 256 * 1024 * 1024
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class LegacyQuery:
    """``q`` scaled float32 ``[Hkv, G*T, D]``, rows ordered (g, t)."""

    q: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.q.shape[1])


def prepare_query(query: torch.Tensor, scale: float, num_kv_heads: int) -> LegacyQuery:
    num_q, num_heads, head_size = query.shape
    group = num_heads // num_kv_heads
    q = (query.to(torch.float32) * scale).view(num_q, num_kv_heads, group, head_size)
    return LegacyQuery(q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * num_q, head_size))


def accumulate(
    state: State,
    pq: LegacyQuery,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    num_q: int,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> State:
    num_k = int(key.shape[0])
    kw = {"q_start": q_start, "causal": causal, "window": window}
    if chunk_fully_masked(num_queries=num_q, k_start=k_start, num_keys=num_k, **kw):  # type: ignore[arg-type]
        return state
    q_prep = pq.q
    rows = int(q_prep.shape[0] * q_prep.shape[1])
    step = max(1, _SCORE_TILE_BYTES // max(1, 4 * rows))
    for s0 in range(0, num_k, step):
        s1 = min(num_k, s0 + step)
        part = _attend(
            q_prep, key[s0:s1], value[s0:s1], num_q, q_start, k_start + s0, causal, window, softcap
        )
        if part is not None:
            state = merge_into(state, part)
    return state


def _attend(
    q_prep: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_q: int,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> State | None:
    scores = torch.bmm(q_prep, key.to(torch.float32).permute(1, 2, 0))
    probs, row_max, row_sum = unnormalized_probabilities(
        scores,
        num_q=num_q,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        softcap=softcap,
    )
    out = torch.bmm(probs, value.to(torch.float32).permute(1, 0, 2))
    out = out / row_sum.clamp_min(_TINY).unsqueeze(-1)
    return out, row_max + torch.log(row_sum)
