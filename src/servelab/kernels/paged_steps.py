"""The per-chunk attention steps of ``cpu_paged_attention``: each attended range (a staged
host chunk or the device suffix) goes through ``attend``, and ``finish`` writes the output
in the query dtype and the natural-log LSE once, at the end.

- :class:`TorchStep` (any device): plain torch operations, each range folded into a float32
  running state (:mod:`servelab.kernels.attention`).
- :class:`TritonStep` (CUDA/XPU, power-of-two head size): one split-K launch per range into a
  partial buffer sized up front, one merge launch per call
  (:mod:`servelab.kernels.paged_step_triton`).
"""

from __future__ import annotations

import torch

from servelab.kernels import paged_step_triton
from servelab.kernels.attention import accumulate, finalize, new_state, prepare_query
from servelab.kernels.paged_plan import Mask


class TorchStep:
    """The torch step (any device): each range folded into a float32 running state."""

    def __init__(self, query: torch.Tensor, num_kv_heads: int, mask: Mask) -> None:
        self.num_q = int(query.shape[0])
        self.mask = mask
        self.pq = prepare_query(query, mask.scale, num_kv_heads)
        self.state = new_state(num_kv_heads, self.pq.rows, int(query.shape[2]), query.device)

    def attend(self, key: torch.Tensor, value: torch.Tensor, k_start: int) -> None:
        m = self.mask
        self.state = accumulate(
            self.state,
            self.pq,
            key,
            value,
            num_q=self.num_q,
            q_start=m.q_start,
            k_start=k_start,
            causal=m.causal,
            window=m.window,
            softcap=m.softcap,
        )

    def finish(self, out: torch.Tensor, out_lse: torch.Tensor) -> None:
        final_out, final_lse = finalize(self.state, self.num_q)
        out.copy_(final_out)  # the one cast to the query dtype
        out_lse.copy_(final_lse)


class TritonStep:
    """The Triton step: partials of every range into one buffer sized up front (``ranges``:
    the key count of each range to come), one merge at the end."""

    def __init__(
        self, query: torch.Tensor, num_kv_heads: int, mask: Mask, ranges: list[int]
    ) -> None:
        self.query = query if query.stride(-1) == 1 else query.contiguous()
        self.num_kv_heads = num_kv_heads
        self.mask = mask
        num_q, num_heads, head_size = query.shape
        rows = num_heads // num_kv_heads * num_q
        kernels = paged_step_triton
        row_blocks = -(-rows // kernels.block_rows(rows))
        block_n, _ = kernels.tile_config(head_size, query.element_size())
        total = sum(kernels.splits_for(n, num_kv_heads, row_blocks, block_n) for n in ranges)
        self.parts = kernels.Parts.allocate(total, num_kv_heads, rows, head_size, query.device)

    def attend(self, key: torch.Tensor, value: torch.Tensor, k_start: int) -> None:
        m = self.mask
        paged_step_triton.attend_parts(
            self.parts,
            self.query,
            key,
            value,
            scale=m.scale,
            q_start=m.q_start,
            k_start=k_start,
            causal=m.causal,
            window=m.window,
            softcap=m.softcap,
        )

    def finish(self, out: torch.Tensor, out_lse: torch.Tensor) -> None:
        if out.stride(-1) == 1:
            paged_step_triton.merge_parts(self.parts, out, out_lse, self.num_kv_heads)
            return
        tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
        paged_step_triton.merge_parts(self.parts, tmp, out_lse, self.num_kv_heads)
        out.copy_(tmp)


Step = TorchStep | TritonStep
