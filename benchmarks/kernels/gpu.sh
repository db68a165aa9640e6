#!/usr/bin/env bash
# The one wrapper for a GPU machine (repo root, on the card): it prepares the machine, runs one
# sub-command's tests and benchmarks, and leaves every log and JSON file in OUTDIR (the card,
# driver and link in gpu.txt, the date in date.txt, nvcc's version in nvcc.txt).
#
# Usage: bash benchmarks/kernels/gpu.sh SUBCOMMAND OUTDIR
#
#   tests         every `-m kernels` test on the card (about 2-4 minutes)
#   paged         CPU-paged attention as BENCHMARKS.md reports it: staging and paged tests,
#                 host time before the first copy, staging alone by every way, then the decode
#                 rows (copy_batch against the CUDA gather, single call and steady state)
#   paged-gather  the gather kernels: host phases, CUDA vs Triton gather alone, the torch vs
#                 Triton chunk step (paged_bench.py --steps); nvcc's register report
#   paged-full    the full paged_bench.py table (copies, every strategy, chunk sizes, overlap),
#                 the pytest-benchmark figures (paged_bench_test.py) and the full-grid subset
#   pytest-bench  only the pytest-benchmark figures of CPU-paged attention, as JSON
#   tq4           TurboQuant decode: the Triton sweep, the CUDA kernel, the 8-layer graph sweep
#   tq4-speed     TurboQuant decode against every bf16 path (tq4_speed.py: cold, warm, graph,
#                 eager; 16K-256K; batch 1 and 8; GQA 1/4/8; host µs a call; configurations),
#                 after the TurboQuant kernel tests (about 7 minutes)
#   tq4-configs   the TurboQuant kernel tests, then only the CUDA kernel's configurations (warps,
#                 table rows 128 or 256 bytes apart, precise table) at 64K and 128K, side by side
#   all           tests, paged's decode rows, tq4 without the graph sweep (about 7 of the
#                 device tool's 10 minutes a command)
#
# -p no:servelab on every pytest: with the package installed, the servelab plugin and
# tests/kernels/conftest.py both registered --kernels-full, and the device's pytest raised
# (seen 2026-11-25) argparse.ArgumentError.
set -u -o pipefail
cmd=${1:?"sub-command: tests | paged | paged-gather | paged-full | pytest-bench | tq4 | tq4-speed | tq4-configs | all"}
out=${2:?output folder}
here=benchmarks/kernels
export PYTHONUNBUFFERED=1
mkdir -p "$out"

prepare() {
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee "$out/date.txt"
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  nvcc --version 2>&1 | tail -1 | tee "$out/nvcc.txt"
  if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
    echo "pip install -e failed (see pip.log); falling back to PYTHONPATH=src"
    export PYTHONPATH=src
  fi
}

kernel_tests() {  # kernel_tests SECONDS LOGNAME [test paths...]
  local secs=$1 log=$2
  shift 2
  timeout "$secs" python3 -m pytest -q -m kernels "${@:-tests/kernels}" -p no:cacheprovider \
    -p no:servelab -rs 2>&1 | tee "$out/$log" | tail -8
}

host_phases() {
  for ctx in 32768 131072; do
    timeout 45 python3 $here/paged_host_phases.py "$ctx" 32768 >"$out/host_phases_$ctx.log" 2>&1
    grep '^HOST' "$out/host_phases_$ctx.log" || tail -3 "$out/host_phases_$ctx.log"
  done
}

paged_batch() {  # paged_batch SECONDS
  timeout "$1" python3 $here/paged_bench.py --out "$out" --batch >"$out/paged_batch.log" 2>&1
  grep -A6 '^SUMMARY' "$out/paged_batch.log" || tail -5 "$out/paged_batch.log"
}

pytest_bench() {
  (cd $here && python3 -m pytest paged_bench_test.py -p no:cacheprovider -p no:servelab -q \
    --benchmark-json="$(realpath "$out")/pytest_benchmark.json" \
    --benchmark-columns=min,median,max,rounds) 2>&1 | tee "$out/pytest_benchmark.log" | tail -14
}

tq4_core() {
  timeout 170 python3 -W ignore $here/turboquant_decode.py --out "$out" >"$out/turboquant.log" 2>&1
  tail -5 "$out/turboquant.log"
  timeout 120 python3 -W ignore $here/turboquant_cuda.py --out "$out" \
    >"$out/turboquant_cuda.log" 2>&1
  tail -4 "$out/turboquant_cuda.log"
}

tq4_layers() {
  timeout 90 python3 -W ignore $here/tq4_layers.py --out "$out" >"$out/tq4_layers.log" 2>&1
  tail -8 "$out/tq4_layers.log"
}

case "$cmd" in
  tests)
    prepare
    kernel_tests 400 tests_cuda.log
    ;;
  paged)
    prepare
    kernel_tests 170 tests_cuda.log tests/kernels/test_staging.py tests/kernels/test_paged.py -x
    host_phases
    timeout 90 python3 $here/paged_staging_ways.py --out "$out" --skip-tma --reps 7 \
      >"$out/staging_ways.log" 2>&1
    grep -v '^{' "$out/staging_ways.log" | tail -30
    paged_batch 240
    ;;
  paged-gather)
    prepare
    kernel_tests 150 tests_cuda.log tests/kernels/test_staging.py tests/kernels/test_paged.py -x
    # nvcc's register report for the gather (cuda_ext keeps it beside the cached library).
    cp "${SERVELAB_CACHE:-$HOME/.cache/servelab}"/cuda/paged_gather-*.log "$out/" 2>/dev/null \
      && grep -h "registers" "$out"/paged_gather-*.log | sort | uniq -c
    host_phases
    timeout 75 python3 $here/paged_gather_bench.py --out "$out" --quick >"$out/paged_gather.log" 2>&1
    grep -A40 '^SUMMARY' "$out/paged_gather.log" || tail -5 "$out/paged_gather.log"
    timeout 150 python3 $here/paged_bench.py --out "$out" --steps >"$out/paged_steps.log" 2>&1
    grep -A6 '^SUMMARY' "$out/paged_steps.log" || tail -5 "$out/paged_steps.log"
    ;;
  paged-full)
    prepare
    kernel_tests 300 tests_default.log tests/kernels/test_reference.py tests/kernels/test_merge.py \
      tests/kernels/test_paged.py tests/kernels/test_staging.py
    timeout 200 python3 -m pytest tests/kernels/test_paged.py -m kernels -p no:cacheprovider \
      -p no:servelab -q --kernels-full -k "test_matches_reference and ch4096 and g8 and d128" \
      2>&1 | tee "$out/tests_full_subset.log" | tail -3
    pytest_bench
    timeout 400 python3 $here/paged_bench.py --out "$out" 2>&1 | tee "$out/bench.log" | tail -80
    ;;
  pytest-bench)
    prepare
    pytest_bench
    ;;
  tq4)
    prepare
    tq4_core
    tq4_layers
    ;;
  tq4-speed)
    prepare
    kernel_tests 150 tests_tq4.log tests/kernels/test_turboquant_fused.py
    timeout 400 python3 -W ignore $here/tq4_speed.py --out "$out" >"$out/tq4_speed.log" 2>&1
    sed -n '/^[A-Z].*GB\/s (read + write)/,$p' "$out/tq4_speed.log" || tail -20 "$out/tq4_speed.log"
    ;;
  tq4-configs)
    prepare
    kernel_tests 150 tests_tq4.log tests/kernels/test_turboquant_fused.py
    timeout 200 python3 -W ignore $here/tq4_speed.py --out "$out" --configs-only \
      >"$out/tq4_configs.log" 2>&1
    sed -n '/^| tokens | warps/,$p' "$out/tq4_configs.log" || tail -20 "$out/tq4_configs.log"
    ;;
  all)
    prepare
    kernel_tests 260 tests_cuda.log
    paged_batch 150
    tq4_core
    ;;
  *)
    echo "unknown sub-command '$cmd': tests | paged | paged-gather | paged-full | pytest-bench | tq4 | tq4-speed | tq4-configs | all" >&2
    exit 2
    ;;
esac
