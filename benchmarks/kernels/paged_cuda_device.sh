#!/usr/bin/env bash
# The CUDA gather of CPU-paged attention in one device-tool call (about 5 minutes): install,
# the staging and paged kernel tests on the card (nvcc builds csrc/paged_gather.cu on first
# use), host time before the first copy per gather kernel, staging alone (CUDA vs Triton
# gather vs the copy rate of the same run), then the --steps decode rows (the CUDA gather is
# the default where nvcc is found; one row keeps the Triton gather). Logs and JSON land in
# OUTDIR; short summaries are printed.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/paged_cuda_device.sh OUTDIR
source "$(dirname "$0")/device_prelude.sh" "${1:-}"
# -p no:servelab: see paged_compare.sh (the device's pytest and the plugin's option).
timeout 150 python3 -m pytest -q -m kernels tests/kernels/test_staging.py \
  tests/kernels/test_paged.py -p no:cacheprovider -p no:servelab -x -rs \
  2>&1 | tee "$out/tests_cuda.log" | tail -8
# nvcc's register report for the gather (cuda_ext keeps it beside the cached library).
cp "${SERVELAB_CACHE:-$HOME/.cache/servelab}"/cuda/paged_gather-*.log "$out/" 2>/dev/null \
  && grep -h "registers" "$out"/paged_gather-*.log | sort | uniq -c
for ctx in 32768 131072; do
  timeout 45 python3 benchmarks/kernels/paged_host_phases.py "$ctx" 32768 >"$out/host_phases_$ctx.log" 2>&1
  grep '^HOST' "$out/host_phases_$ctx.log" || tail -3 "$out/host_phases_$ctx.log"
done
timeout 75 python3 benchmarks/kernels/paged_gather_bench.py --out "$out" --quick >"$out/paged_gather.log" 2>&1
grep -A40 '^SUMMARY' "$out/paged_gather.log" || tail -5 "$out/paged_gather.log"
timeout 150 python3 benchmarks/kernels/paged_bench.py --out "$out" --steps >"$out/paged_steps.log" 2>&1
grep -A6 '^SUMMARY' "$out/paged_steps.log" || tail -5 "$out/paged_steps.log"
