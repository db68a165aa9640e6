"""Kernel-level device times of one attention step (decode shape, one 32K-token chunk).

python3 benchmarks/kernels/paged_profile.py   # CUDA only; prints torch.profiler's table
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from servelab.kernels.attention import accumulate, new_state, prepare_query

HKV, HEAD, GQA, S = 8, 128, 8, 32768


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HKV * GQA, HEAD, generator=g).to(torch.bfloat16).to(dev)
    k = torch.randn(S, HKV, HEAD, generator=g).to(torch.bfloat16).to(dev)
    v = torch.randn(S, HKV, HEAD, generator=g).to(torch.bfloat16).to(dev)

    def step() -> None:
        pq = prepare_query(q, HEAD**-0.5, HKV)
        st = new_state(HKV, pq.rows, HEAD, dev)
        kw = {"num_q": 1, "q_start": S, "k_start": 0, "causal": True}
        accumulate(st, pq, k, v, window=None, softcap=None, **kw)  # type: ignore[arg-type]

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    )


if __name__ == "__main__":
    main()
