"""Attention over one contiguous key range, with LSE: the per-chunk step.

Plain torch operations, so the same code runs on ``cpu``, ``cuda`` and ``xpu``. Keys and
values are read in their storage dtype and never copied: both products take the storage
dtype with float32 accumulation and a float32 result (``out_dtype=torch.float32`` on CUDA;
elsewhere the operands are upcast, which is the same function: a product of two bf16/fp16
numbers is exact in float32). Scores, the scale, soft-cap, mask, softmax, LSE and the
running state are float32; the probabilities are cast to the value dtype for P·V, as
FlashAttention and vLLM's references do (docs/kernels-paged.md §1.3, §1.5). Re-rounding the
running state to bf16 would cost ~8x error (§1.4 there); it stays float32 and is cast once.

Two layouts of the products (chosen per call by :func:`prepare_query`):

- *block diagonal* (decode: ``Hkv * G * T <= 128`` query rows): the query becomes one
  ``[Hkv*G*T, Hkv*D]`` matrix that is zero outside each row's own KV head, so the scores
  are one matrix product with the chunk's keys viewed as ``[S, Hkv*D]`` (contiguous, read
  once) and P·V one product with the values viewed the same way, split along the keys so
  that every SM gets work. The zeros cost ``Hkv``-fold arithmetic, which at <= 128 rows
  still sits under the memory time (the products are bound by reading K and V).
- *per head* (prefill, more rows): one batched product per KV head over stride views.

Grouped-query heads are never repeated. The running state of a sequence lives in a
head-major layout, ``out [Hkv, G*T, D]`` and ``lse [Hkv, G*T]`` (rows ordered (g, t));
:func:`finalize` converts to ``[T, Hq, D]`` once.

float32 matrix products (float32 caches) must not run in TF32: if a caller enabled
``torch.backends.cuda.matmul.allow_tf32`` the error grows to ~1e-3 relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from servelab.kernels.reference import visibility_mask

# Cap on the float32 score tile (bytes): longer key ranges are split and merged.
_SCORE_TILE_BYTES = 256 * 1024 * 1024
_TINY = torch.finfo(torch.float32).tiny
# Query rows (Hkv * G * T) up to which the block-diagonal layout is used.
BLOCK_DIAGONAL_MAX_ROWS = 128
# Keys per partial product in the block-diagonal P·V (its parts run on separate SMs).
PV_SPLIT_KEYS = 1024
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# torch >= 2.8 has mm/bmm(..., out_dtype): low-precision operands, float32 result (CUDA).
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.bmm, "dtype")

State = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PreparedQuery:
    """Queries laid out for the products, unscaled, in the query (= KV) dtype.

    ``q`` is ``[Hkv*R, Hkv*D]`` (block diagonal) or ``[Hkv, R, D]`` (per head), with
    ``R = G*T`` rows per KV head ordered (g, t). ``scale`` is applied to the float32 scores.
    """

    q: torch.Tensor
    num_kv_heads: int
    rows: int
    scale: float
    block_diagonal: bool


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


def prepare_query(
    query: torch.Tensor,
    scale: float,
    num_kv_heads: int,
    *,
    block_diagonal: bool | None = None,
) -> PreparedQuery:
    """Lay ``query [T, Hq, D]`` out for :func:`accumulate`; ``block_diagonal=None`` picks
    the layout by the number of query rows (module docstring)."""
    num_q, num_heads, head_size = query.shape
    group = num_heads // num_kv_heads
    rows = group * num_q
    per_head = (
        query.reshape(num_q, num_kv_heads, group, head_size)
        .permute(1, 2, 0, 3)
        .reshape(num_kv_heads, rows, head_size)
    )
    if block_diagonal is None:
        block_diagonal = num_kv_heads * rows <= BLOCK_DIAGONAL_MAX_ROWS
    if not block_diagonal:
        return PreparedQuery(per_head.contiguous(), num_kv_heads, rows, scale, False)
    q = query.new_zeros(num_kv_heads, rows, num_kv_heads, head_size)
    # The diagonal view [R, D, Hkv] of (head, ., head, .) is where each head's rows go.
    torch.diagonal(q, dim1=0, dim2=2).copy_(per_head.permute(1, 2, 0))
    q = q.view(num_kv_heads * rows, num_kv_heads * head_size)
    return PreparedQuery(q, num_kv_heads, rows, scale, True)


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
    pq: PreparedQuery,
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
    ``state``; ``pq`` from :func:`prepare_query`. Trusted arguments. A range no query sees
    leaves ``state`` as it is (:func:`_attend` skips it, tile by tile)."""
    num_k = int(key.shape[0])
    rows = pq.num_kv_heads * pq.rows
    step = max(1, _SCORE_TILE_BYTES // max(1, 4 * rows))
    for s0 in range(0, num_k, step):
        s1 = min(num_k, s0 + step)
        part = _attend(
            pq,
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


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D or batched 3-D) with float32 accumulation and a float32 result,
    reading bf16/fp16 operands as they are stored on CUDA."""
    if a.dtype in _LOW_PRECISION and a.device.type == "cuda" and _HAS_OUT_DTYPE:
        if a.dim() == 3:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.matmul(a.to(torch.float32), b.to(torch.float32))


def _split_keys_matmul(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p [M, S] @ v [S, N]`` in float32 as a batch of ``PV_SPLIT_KEYS``-key parts summed
    afterwards: a single product with M = 64 rows and S = 32K would keep a handful of SMs
    busy for the whole reduction."""
    num_k = int(p.shape[1])
    parts = num_k // PV_SPLIT_KEYS
    if parts < 2:
        return matmul_f32(p, v)
    main = parts * PV_SPLIT_KEYS
    m, n = int(p.shape[0]), int(v.shape[1])
    pb = p[:, :main].view(m, parts, PV_SPLIT_KEYS).transpose(0, 1)
    vb = v[:main].view(parts, PV_SPLIT_KEYS, n)
    out = matmul_f32(pb, vb).sum(dim=0)
    if main < num_k:
        out += matmul_f32(p[:, main:], v[main:])
    return out


def _attend(
    pq: PreparedQuery,
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
    num_k, num_kv_heads, head_size = key.shape
    if chunk_fully_masked(
        q_start=q_start,
        num_queries=num_q,
        k_start=k_start,
        num_keys=num_k,
        causal=causal,
        window=window,
    ):
        return None
    rows = pq.rows
    width = num_kv_heads * head_size
    # Scores [Hkv, R, S] in float32, straight from the stored keys.
    if pq.block_diagonal:
        scores = matmul_f32(pq.q, key.reshape(num_k, width).t()).view(num_kv_heads, rows, num_k)
    else:
        scores = matmul_f32(pq.q, key.permute(1, 2, 0))
    scores.mul_(pq.scale)
    probs, row_max, row_sum = unnormalized_probabilities(
        scores,
        num_q=num_q,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        softcap=softcap,
    )
    probs_v = probs.to(value.dtype)  # as FlashAttention: P in the value dtype for P·V
    if pq.block_diagonal:
        full = _split_keys_matmul(
            probs_v.view(num_kv_heads * rows, num_k), value.reshape(num_k, width)
        )
        # Row block h against column block h: [R, D, Hkv] diagonal, back to [Hkv, R, D].
        out = torch.diagonal(
            full.view(num_kv_heads, rows, num_kv_heads, head_size), dim1=0, dim2=2
        ).permute(2, 0, 1)
    else:
        out = matmul_f32(probs_v, value.permute(1, 0, 2))
    out = out / row_sum.clamp_min(_TINY).unsqueeze(-1)  # empty row: 0 / tiny = 0
    return out, row_max + torch.log(row_sum)


def unnormalized_probabilities(
    scores: torch.Tensor,
    *,
    num_q: int,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled float32 scores ``[Hkv, G*T, S]`` (rows ordered (g, t)) to ``(exp(s - max),
    max, sum)`` per row, after soft-cap and the visibility mask; consumes ``scores``. A row
    that sees no key has max 0 and sum 0, never NaN."""
    num_kv_heads, rows, num_k = scores.shape
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = visibility_mask(
        num_q,
        num_k,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        device=scores.device,
    )
    if mask is not None:
        group = rows // num_q
        scores = scores.view(num_kv_heads, group, num_q, num_k).masked_fill(~mask, -math.inf)
        scores = scores.view(num_kv_heads, rows, num_k)
    row_max = torch.nan_to_num(scores.amax(dim=-1), neginf=0.0)  # all-masked row: 0
    probs = scores.sub_(row_max.unsqueeze(-1)).exp_()
    return probs, row_max, probs.sum(dim=-1)


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
    block_diagonal: bool | None = None,
) -> State:
    """Float32 ``(out [T, Hq, D], lse [T, Hq])`` of ``query`` over keys at ``k_start..``.

    Arguments are trusted (the public entry points validate them). Queries that see no key
    get output 0 and LSE -inf.
    """
    num_q, _, head_size = query.shape
    num_kv_heads = int(key.shape[1])
    pq = prepare_query(query, scale, num_kv_heads, block_diagonal=block_diagonal)
    state = new_state(num_kv_heads, pq.rows, head_size, query.device)
    state = accumulate(
        state,
        pq,
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
