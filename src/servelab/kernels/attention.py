"""Attention over one contiguous key range, with LSE, in float32: the per-chunk step.

Plain torch operations, so the same code runs on ``cpu``, ``cuda`` and ``xpu``. Keys and
values are read in their storage dtype and upcast once per chunk; scores, softmax and P·V
run in float32 (re-rounding partials to bf16 costs ~8x error, reference/kernels.md §1.4).
Grouped-query heads are handled by a view (query head ``h`` reads key/value head
``h // (Hq / Hkv)``), never by repeating keys.

:func:`accumulate` folds one range into a running float32 state, either with these torch
operations or, on CUDA, with the fused Triton kernel of
:mod:`servelab.kernels.attention_triton` (one launch instead of ~40).

float32 matrix products must not run in TF32: if a caller enabled
``torch.backends.cuda.matmul.allow_tf32`` the error grows to ~1e-3 relative.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from servelab.errors import KernelInputError
from servelab.kernels.merge import merge_states
from servelab.kernels.reference import visibility_mask

# Cap on the float32 score tile (bytes) so long prefills over large chunks stay bounded.
_SCORE_TILE_BYTES = 256 * 1024 * 1024


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(out [T, Hq, D], lse [T, Hq])`` of ``query`` over keys at ``k_start..``.

    Arguments are trusted (the public entry points validate them). Queries that see no key
    get output 0 and LSE -inf.
    """
    num_q, num_heads, head_size = query.shape
    num_k, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    if chunk_fully_masked(
        q_start=q_start,
        num_queries=num_q,
        k_start=k_start,
        num_keys=num_k,
        causal=causal,
        window=window,
    ):
        return _empty_state(num_q, num_heads, head_size, query.device)
    # [Hkv, D, S] and [Hkv, S, D] in float32, one upcast per chunk.
    k_t = key.to(torch.float32).permute(1, 2, 0)
    v_t = value.to(torch.float32).permute(1, 0, 2)
    tile = max(1, _SCORE_TILE_BYTES // max(1, 4 * num_heads * num_k))
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for t0 in range(0, num_q, tile):
        t1 = min(num_q, t0 + tile)
        out, lse = _attend_tile(
            query[t0:t1],
            k_t,
            v_t,
            scale=scale,
            group=group,
            q_start=q_start + t0,
            k_start=k_start,
            causal=causal,
            window=window,
            softcap=softcap,
        )
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


def _attend_tile(
    query: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    *,
    scale: float,
    group: int,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_q, num_heads, head_size = query.shape
    num_kv_heads, _, num_k = k_t.shape
    # [Hkv, G*T, D]: rows ordered (g, t) so the scores view as [Hkv, G, T, S].
    q = (query.to(torch.float32) * scale).view(num_q, num_kv_heads, group, head_size)
    q = q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * num_q, head_size)
    scores = torch.bmm(q, k_t).view(num_kv_heads, group, num_q, num_k)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = visibility_mask(
        num_q,
        num_k,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        device=query.device,
    )
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)
    row_sum = probs.sum(dim=-1, keepdim=True)
    out = torch.bmm(probs.view(num_kv_heads, group * num_q, num_k), v_t)
    out = out.view(num_kv_heads, group, num_q, head_size)
    out = out / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    lse = (row_max + torch.log(row_sum)).squeeze(-1)  # [Hkv, G, T]
    out = out.permute(2, 0, 1, 3).reshape(num_q, num_heads, head_size)
    lse = lse.permute(2, 0, 1).reshape(num_q, num_heads)
    return out, lse


def _empty_state(
    num_q: int, num_heads: int, head_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(num_q, num_heads, head_size, dtype=torch.float32, device=device)
    lse = torch.full((num_q, num_heads), -math.inf, dtype=torch.float32, device=device)
    return out, lse


def resolve_impl(impl: str, query: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for ``impl`` in (auto, torch, triton).

    ``auto`` takes the fused Triton kernel where it runs (CUDA, Triton importable, a
    power-of-two head size 16..256) and the torch-op path everywhere else.
    """
    if impl not in ("auto", "torch", "triton"):
        raise KernelInputError(f"attention_impl must be 'auto', 'torch' or 'triton'; got {impl!r}")
    if impl == "torch":
        return "torch"
    ok = query.device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if ok:
        from servelab.kernels.attention_triton import supported

        ok = supported(query, int(query.shape[-1]))
    if impl == "triton" and not ok:
        raise KernelInputError(
            "attention_impl='triton' needs a CUDA device, Triton, a float16/bfloat16/float32 "
            f"query and a power-of-two head size in [16, 256]; got {query.device}, "
            f"{query.dtype}, head {query.shape[-1]}. Use 'auto' or 'torch'"
        )
    return "triton" if ok else "torch"


def new_state(
    num_q: int, num_heads: int, head_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty float32 running state: output 0, LSE -inf."""
    return _empty_state(num_q, num_heads, head_size, device)


def accumulate(
    state: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    impl: str,
    scale: float,
    q_start: int,
    k_start: int,
    causal: bool,
    window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold attention over one key range into ``state``; returns the new state.

    ``impl`` is resolved (``"torch"`` or ``"triton"``). The Triton kernel updates ``state``
    in place; the torch path returns fresh tensors.
    """
    if chunk_fully_masked(
        q_start=q_start,
        num_queries=int(query.shape[0]),
        k_start=k_start,
        num_keys=int(key.shape[0]),
        causal=causal,
        window=window,
    ):
        return state
    if impl == "triton":
        from servelab.kernels.attention_triton import attend_merge

        attend_merge(
            state[0],
            state[1],
            query if query.stride(-1) == 1 else query.contiguous(),
            key,
            value,
            scale=scale,
            q_start=q_start,
            k_start=k_start,
            causal=causal,
            window=window,
            softcap=softcap,
        )
        return state
    part = attend_range(
        query,
        key,
        value,
        scale=scale,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        window=window,
        softcap=softcap,
    )
    return merge_states(*state, *part)
