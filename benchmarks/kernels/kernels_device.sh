#!/usr/bin/env bash
# Everything the kernel issues need from one device-tool call (about 7 of its 10 minutes):
# install, every `-m kernels` test on the card, the CPU-paged step benchmark (single call and
# steady state, copy rate per row) and the TurboQuant decode benchmark. Logs and JSON land in
# OUTDIR; the summary tables are printed last.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/kernels_device.sh OUTDIR
set -u -o pipefail
out=${1:?output folder}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
date -u +%FT%TZ | tee "$out/date.txt"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
  echo "pip install -e failed (see pip.log); falling back to PYTHONPATH=src"
  export PYTHONPATH=src
fi
# -p no:servelab: see paged_compare.sh (the device's pytest and the plugin's option).
timeout 260 python3 -m pytest -q -m kernels tests/kernels -p no:cacheprovider -p no:servelab -rs \
  2>&1 | tee "$out/tests_cuda.log" | tail -6
timeout 110 python3 benchmarks/kernels/paged_bench.py --out "$out" --steps >"$out/paged_steps.log" 2>&1
grep -A6 '^SUMMARY' "$out/paged_steps.log"
timeout 170 python3 -W ignore benchmarks/kernels/turboquant_decode.py --out "$out" \
  >"$out/turboquant.log" 2>&1
tail -5 "$out/turboquant.log"
