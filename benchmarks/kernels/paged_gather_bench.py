"""Staging alone: the CUDA gather against the Triton gather and the pinned copy rate, one run.

For each context (32K, 128K, 512K host tokens, bf16, 8 KV heads, head 128, 256-token blocks,
random table) the decode chunk loop with only the staging (``paged_bench.bench_split``),
32 programs, 32K-token chunks, with each gather kernel; then the CUDA gather's knobs
(programs x threads) on one 32K-token chunk of 256-token and of 16-token blocks. Each
context's row is judged against a copy rate measured right before it (the link drifts).

    PYTHONPATH=src python3 benchmarks/kernels/paged_gather_bench.py --out DIR [--quick]

Writes ``paged_gather.json`` / ``paged_gather.md`` under DIR; prints a SUMMARY table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from paged_bench import (
    MAX_CTX,
    Figure,
    HostKV,
    MiB,
    _copy_rate_and_host,
    _triton_version,
    bench_copies,
    bench_split,
    figure,
    kv_bytes,
    random_table,
    save_run,
    time_cuda,
)

from servelab.kernels import gather_cuda
from servelab.kernels.staging import StagingScratch


def knob_sweep(host: HostKV, block: int, reps: int) -> list[Figure]:
    """The CUDA gather on one 32K-token chunk: programs x threads."""
    cache = host.cache(block)
    nb = 32768 // block
    dev = torch.device("cuda")
    ids = random_table(cache.num_blocks, nb, 1).pin_memory()
    scratch = StagingScratch.allocate(
        chunk_blocks=nb, block_size=block, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
        device=dev, buffers=1,
    )  # fmt: skip
    figs = []
    for programs in (16, 32, 64, 132):
        for threads in (128, 256, 512):

            def run(p: int = programs, t: int = threads) -> None:
                gather_cuda.gather_kv_blocks_from_host(
                    cache.key, cache.value, ids, scratch.key[0], scratch.value[0],
                    programs=p, threads=t,
                )  # fmt: skip

            params = {"block": block, "chunk_tokens": nb * block, "programs": programs,
                      "threads": threads}  # fmt: skip
            figs.append(figure("cuda_gather_sweep", params, time_cuda(run, reps), kv_bytes(32768)))
    return figs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("paged_gather_bench needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    probe = torch.empty(1, 1, 1, 1, pin_memory=True)
    env: dict[str, Any] = {
        "card": torch.cuda.get_device_name(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_gather": gather_cuda.available(probe, dev),
    }
    if not env["cuda_gather"]:
        print("the CUDA gather is unavailable here (nvcc?); nothing to compare", file=sys.stderr)
        return 2
    reps = 5 if args.quick else 10
    figs, copy_rate, host = _copy_rate_and_host(reps, t0)
    rows = []
    for ctx in (32 * 1024, 128 * 1024, MAX_CTX):
        r = reps if ctx < MAX_CTX else max(5, reps // 2)
        row_copies = bench_copies([256 * MiB, 1024 * MiB], reps=reps)
        rate = max(f.gbps for f in row_copies)
        row: dict[str, Any] = {"ctx": ctx, "rate": rate}
        for kernel in ("triton", "cuda"):
            f = bench_split(
                host, ctx, 256, 32768, r, programs=32, with_compute=False, kernel=kernel
            )[0]
            figs.append(f)
            row[kernel] = f
        figs += row_copies
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.1f}s] ctx {ctx}", flush=True)
    sweep = knob_sweep(host, 256, reps) + knob_sweep(host, 16, reps)
    figs += sweep
    save_run(args.out, "paged_gather", env, copy_rate, [], figs)
    lines = [
        f"SUMMARY card {env['card']} {env['date_utc']}: staging only, 32K chunks, bs256, random "
        "table, 32 programs; ms (% of the pinned copy rate measured just before the row)",
        "| ctx | row copy GB/s | triton gather | cuda gather |",
        "|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{row[k].median_ms:.2f} ({100 * row[k].gbps / row['rate']:.0f}%)"
            for k in ("triton", "cuda")
        ]
        lines.append(f"| {row['ctx'] // 1024}K | {row['rate']:.1f} | " + " | ".join(cells) + " |")
    lines.append(f"cuda gather, one 32K chunk, % of {copy_rate:.1f} GB/s (programs x threads):")
    for f in sweep:
        p = f.params
        lines.append(
            f"  bs{p['block']} p{p['programs']} t{p['threads']}: {f.median_ms:.2f} ms "
            f"({100 * f.gbps / copy_rate:.0f}%)"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "paged_gather_summary.md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
