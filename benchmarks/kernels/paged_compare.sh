#!/usr/bin/env bash
# One device-tool call: install, the staging/paged kernel tests on CUDA, then the old vs new
# attention-step comparison (paged_bench.py --compare). Logs land in OUTDIR; a short summary
# table is printed last.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/paged_compare.sh OUTDIR
set -u -o pipefail
out=${1:?output folder}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>&1 | tee "$out/gpu.txt"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
  echo "pip install -e failed (see pip.log); falling back to PYTHONPATH=src"
  export PYTHONPATH=src
fi
# -p no:servelab: with the package installed, the servelab plugin and tests/kernels/conftest.py
# both register --kernels-full, and the device's pytest raised (seen 2026-11-25)
# argparse.ArgumentError, which the conftest's suppress(ValueError) does not catch.
python3 -m pytest -q -m kernels tests/kernels/test_paged.py tests/kernels/test_staging.py \
  -p no:cacheprovider -p no:servelab -rs 2>&1 | tee "$out/tests_cuda.log" | tail -8
python3 benchmarks/kernels/paged_bench.py --out "$out" --compare 2>&1 \
  | tee "$out/bench_compare.log" | grep -v "^| decode\|^| stage_only\|^| compute_only\|^| h2d\|^| d2h" | tail -30
