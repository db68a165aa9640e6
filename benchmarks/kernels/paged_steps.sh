#!/usr/bin/env bash
# One device-tool call: install, the paged/staging/Triton-step kernel tests on CUDA, then the
# torch vs Triton chunk-step comparison (paged_bench.py --steps). Logs land in OUTDIR.
# Usage (repo root, on the GPU machine): bash benchmarks/kernels/paged_steps.sh OUTDIR
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
# -p no:servelab: see paged_compare.sh (the device's pytest and the plugin's option).
python3 -m pytest -q -m kernels tests/kernels/test_paged.py tests/kernels/test_staging.py \
  tests/kernels/test_decode_triton.py -p no:cacheprovider -p no:servelab -rs -x 2>&1 \
  | tee "$out/tests_cuda.log" | tail -8
python3 benchmarks/kernels/paged_bench.py --out "$out" --steps 2>&1 \
  | tee "$out/bench_steps.log" | grep -v "^| decode\|^| stage_only\|^| h2d\|^| d2h" | tail -30
