#!/usr/bin/env bash
# Everything the kernel issues need from one device-tool call (about 7 of its 10 minutes):
# install, every `-m kernels` test on the card, the CPU-paged decode benchmark (copy_batch
# against the CUDA gather, single call and steady state, copy rate per row) and the TurboQuant decode benchmarks (Triton, then CUDA). Logs and JSON land in
# OUTDIR; the summary tables are printed last.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/kernels_device.sh OUTDIR
source "$(dirname "$0")/device_prelude.sh" "${1:-}"
# -p no:servelab: see paged_compare.sh (the device's pytest and the plugin's option).
timeout 260 python3 -m pytest -q -m kernels tests/kernels -p no:cacheprovider -p no:servelab -rs \
  2>&1 | tee "$out/tests_cuda.log" | tail -6
timeout 150 python3 benchmarks/kernels/paged_bench.py --out "$out" --batch >"$out/paged_batch.log" 2>&1
grep -A6 '^SUMMARY' "$out/paged_batch.log"
timeout 170 python3 -W ignore benchmarks/kernels/turboquant_decode.py --out "$out" \
  >"$out/turboquant.log" 2>&1
tail -5 "$out/turboquant.log"
timeout 120 python3 -W ignore benchmarks/kernels/turboquant_cuda.py --out "$out" \
  >"$out/turboquant_cuda.log" 2>&1
tail -4 "$out/turboquant_cuda.log"
