#!/usr/bin/env bash
# The copy engines' batch (copy_batch staging) in one device-tool call (about 6 minutes):
# install, the staging and paged kernel tests on the card, host time before the first copy
# per way, staging alone by every way measured (paged_staging_ways.py), then the decode rows
# of paged_bench.py --batch (copy_batch against the CUDA gather, same run). Logs and JSON land
# in OUTDIR; short summaries are printed.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/paged_batch_device.sh OUTDIR
source "$(dirname "$0")/device_prelude.sh" "${1:-}"
# -p no:servelab: see paged_compare.sh (the device's pytest and the plugin's option).
timeout 170 python3 -m pytest -q -m kernels tests/kernels/test_staging.py \
  tests/kernels/test_paged.py -p no:cacheprovider -p no:servelab -x -rs \
  2>&1 | tee "$out/tests_cuda.log" | tail -8
for ctx in 32768 131072; do
  timeout 45 python3 benchmarks/kernels/paged_host_phases.py "$ctx" 32768 >"$out/host_phases_$ctx.log" 2>&1
  grep '^HOST' "$out/host_phases_$ctx.log" || tail -3 "$out/host_phases_$ctx.log"
done
timeout 90 python3 benchmarks/kernels/paged_staging_ways.py --out "$out" --skip-tma --reps 7 \
  >"$out/staging_ways.log" 2>&1
grep -v '^{' "$out/staging_ways.log" | tail -30
timeout 240 python3 benchmarks/kernels/paged_bench.py --out "$out" --batch >"$out/paged_batch.log" 2>&1
grep -A6 '^SUMMARY' "$out/paged_batch.log" || tail -5 "$out/paged_batch.log"
