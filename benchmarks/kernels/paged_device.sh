#!/usr/bin/env bash
# One device-tool call: kernel tests on CUDA, then the CPU-paged benchmarks.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/paged_device.sh OUTDIR [FULL_K]
# Logs land in OUTDIR; a short table is printed last.
set -u -o pipefail
out=${1:?output folder}
full_k=${2:-"ch4096 and g8 and d128"}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current \
  --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
tests="tests/kernels/test_reference.py tests/kernels/test_merge.py tests/kernels/test_paged.py tests/kernels/test_staging.py"
python3 -m pytest $tests -m kernels -p no:cacheprovider -q -rs 2>&1 | tee "$out/tests_default.log" | tail -4
python3 -m pytest tests/kernels/test_paged.py -m kernels -p no:cacheprovider -q --kernels-full \
  -k "test_matches_reference and $full_k" 2>&1 | tee "$out/tests_full_subset.log" | tail -3
python3 -m pytest benchmarks/kernels/paged_bench_test.py -p no:cacheprovider -q \
  --benchmark-json="$out/pytest_benchmark.json" --benchmark-columns=min,median,max,rounds \
  2>&1 | tee "$out/pytest_benchmark.log" | tail -14
python3 benchmarks/kernels/paged_bench.py --out "$out" 2>&1 | tee "$out/bench.log" | tail -80
