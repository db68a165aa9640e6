"""Attention over one contiguous key range, with LSE, in float32: the per-chunk step.

Plain torch operations, so the same code runs on ``cpu``, ``cuda`` and ``xpu``. Keys and
values are read in their storage dtype and upcast once per chunk; scores, softmax and P·V
run in float32 (re-rounding partials to bf16 costs ~8x error, reference/kernels.md §1.4).
Grouped-query heads are handled by a view (query head ``h`` reads key/value head
``h // (Hq / Hkv)``), never by repeating keys.

The running state of a sequence lives in a head-major layout, ``out [Hkv, G*T, D]`` and
``lse [Hkv, G*T]`` (rows ordered (g, t)), so a chunk costs about a dozen kernel launches
plus the merge: on the H100 machine the host time to issue them, not the GPU, bounds a
chunk's compute (docs/kernels-paged.md). :func:`finalize` converts to ``[T, Hq, D]`` once.

float32 matrix products must not run in TF32: if a caller enabled
``torch.backends.cuda.matmul.allow_tf32`` the error grows to ~1e-3 relative.
"""

from __future__ import annotations

import math

import torch

from servelab.kernels.reference import visibility_mask

# Cap on the float32 score tile (bytes): longer key ranges are split and merged.
_SCORE_TILE_BYTES = 256 * 1024 * 1024
_TINY = torch.finfo(torch.float32).tiny

State = tuple[torch.Tensor, torch.Tensor]


def chunk_fully_masked(
    *,
    q_start: int,
    num_queries: int,
    k_start: int,
    num_keys: int,
    causal: bool,
    window: int | None,
) -> bool:
    """True when no query sees any key of the range (the chunk need not be staged at all).

    The keys visible to some query form the interval [q_first - window + 1, q_last]
    (unbounded above without ``causal``, below without ``window``).
    """
    if num_keys == 0 or num_queries == 0:
        return True
    q_first, q_last = q_start, q_start + num_queries - 1
    k_first, k_last = k_start, k_start + num_keys - 1
    if causal and k_first > q_last:
        return True
    return window is not None and k_last < q_first - window + 1


def prepare_query(query: torch.Tensor, scale: float, num_kv_heads: int) -> torch.Tensor:
    """``query [T, Hq, D]`` as scaled float32 ``[Hkv, G*T, D]``, rows ordered (g, t)."""
    num_q, num_heads, head_size = query.shape
    group = num_heads // num_kv_heads
    q = (query.to(torch.float32) * scale).view(num_q, num_kv_heads, group, head_size)
    return q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * num_q, head_size)


def new_state(num_kv_heads: int, rows: int, head_size: int, device: torch.device) -> State:
    """An empty running state: output 0, LSE -inf."""
    out = torch.zeros(num_kv_heads, rows, head_size, dtype=torch.float32, device=device)
    lse = torch.full((num_kv_heads, rows), -math.inf, dtype=torch.float32, device=device)
    return out, lse


def merge_into(state: State, part: State) -> State:
    """LSE merge of two head-major states (trusted, natural log, -inf for empty).

    Same formula as :func:`servelab.kernels.merge.merge_states` without its argument checks
    and +inf conversion, which the per-chunk loop does not need.
    """
    (oa, la), (ob, lb) = state, part
    m = torch.nan_to_num(torch.maximum(la, lb), neginf=0.0)  # both empty: shift by 0
    wa = torch.exp(la - m)
    wb = torch.exp(lb - m)
    total = wa + wb
    inv = total.clamp_min(_TINY).reciprocal()  # total 0 only when wa = wb = 0
    out = oa * (wa * inv).unsqueeze(-1) + ob * (wb * inv).unsqueeze(-1)
    return out, m + torch.log(total)


def accumulate(
    state: State,
    q_prep: torch.Tensor,
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
    """Fold attention over keys at ``k_start..`` (``key``/``value`` ``[S, Hkv, D]``) into
    ``state``; ``q_prep`` from :func:`prepare_query`. Trusted arguments."""
    num_k = int(key.shape[0])
    if chunk_fully_masked(
        q_start=q_start,
        num_queries=num_q,
        k_start=k_start,
        num_keys=num_k,
        causal=causal,
        window=window,
    ):
        return state
    rows = int(q_prep.shape[0] * q_prep.shape[1])
    step = max(1, _SCORE_TILE_BYTES // max(1, 4 * rows))
    for s0 in range(0, num_k, step):
        s1 = min(num_k, s0 + step)
        part = _attend(
            q_prep,
            key[s0:s1],
            value[s0:s1],
            num_q=num_q,
            q_start=q_start,
            k_start=k_start + s0,
            causal=causal,
            window=window,
            softcap=softcap,
        )
        if part is not None:
            state = merge_into(state, part)
    return state


def _attend(
    q_prep: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    num_q: int,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> State | None:
    num_k, num_kv_heads, _ = key.shape
    if chunk_fully_masked(
        q_start=q_start,
        num_queries=num_q,
        k_start=k_start,
        num_keys=num_k,
        causal=causal,
        window=window,
    ):
        return None
    rows = q_prep.shape[1]
    # [Hkv, R, S]: keys as [Hkv, D, S] through a stride view, one upcast each.
    scores = torch.bmm(q_prep, key.to(torch.float32).permute(1, 2, 0))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = visibility_mask(
        num_q,
        num_k,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        device=q_prep.device,
    )
    if mask is not None:
        group = rows // num_q
        scores = scores.view(num_kv_heads, group, num_q, num_k).masked_fill(~mask, -math.inf)
        scores = scores.view(num_kv_heads, rows, num_k)
    row_max = torch.nan_to_num(scores.amax(dim=-1), neginf=0.0)  # all-masked row: 0
    probs = torch.exp(scores - row_max.unsqueeze(-1))
    row_sum = probs.sum(dim=-1)
    out = torch.bmm(probs, value.to(torch.float32).permute(1, 0, 2))
    out = out / row_sum.clamp_min(_TINY).unsqueeze(-1)  # empty row: 0 / tiny = 0
    return out, row_max + torch.log(row_sum)


def finalize(state: State, num_q: int) -> State:
    """Head-major state to ``(out [T, Hq, D], lse [T, Hq])`` (float32)."""
    out, lse = state
    num_kv_heads, rows, head_size = out.shape
    group = rows // num_q
    out_t = out.view(num_kv_heads, group, num_q, head_size).permute(2, 0, 1, 3)
    lse_t = lse.view(num_kv_heads, group, num_q).permute(2, 0, 1)
    return (
        out_t.reshape(num_q, num_kv_heads * group, head_size),
        lse_t.reshape(num_q, num_kv_heads * group),
    )


def attend_range(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> State:
    """Float32 ``(out [T, Hq, D], lse [T, Hq])`` of ``query`` over keys at ``k_start..``.

    Arguments are trusted (the public entry points validate them). Queries that see no key
    get output 0 and LSE -inf.
    """
    num_q, _, head_size = query.shape
    num_kv_heads = int(key.shape[1])
    q_prep = prepare_query(query, scale, num_kv_heads)
    state = new_state(num_kv_heads, int(q_prep.shape[1]), head_size, query.device)
    state = accumulate(
        state,
        q_prep,
        key,
        value,
        num_q=num_q,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        softcap=softcap,
    )
    return finalize(state, num_q)
