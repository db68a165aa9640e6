#!/usr/bin/env bash
# GPU machine, one command (carry .gpu/w: the pydantic wheels from scripts/gpu/bundle.sh, copied
# from .gpu/a/wheels): does the NVML sampler slow servelab's client? (issue 16 item 3)
# The server is the scripted stand-in (tests/fakes/scripted_server.py): it streams at a fixed
# TTFT and inter-token gap, so what moves between the with/without runs is the client alone
# (a real engine's own run-to-run spread, ±5 % at c64 on llama-server, hides a 1 % effect).
# The sampler reads the real card through NVML, in the client's process, as in the perf suite.
#   c1 at a 1.7 ms gap (llama-server's single-stream TPOT on an H100), c64 at 34 ms (its c64 TPOT).
set -uo pipefail
OUT=${OUT:-$PWD/.device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/w/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
level() {  # concurrency itl_ms requests
  python3 -m tests.fakes.scripted_server --ttft-ms 20 --itl-ms "$2" > "$OUT/server-c$1.txt" 2>&1 &
  local pid=$!
  for _ in $(seq 50); do grep -q '^port' "$OUT/server-c$1.txt" 2>/dev/null && break; sleep 0.2; done
  local port; port=$(awk '/^port/{print $2}' "$OUT/server-c$1.txt")
  timeout "${LEVEL_TIMEOUT:-200}" python3 benchmarks/telemetry_overhead.py --base-url "http://127.0.0.1:$port" \
    --model scripted --profile none --telemetry nvml --concurrency "$1" --requests "$3" \
    --output-tokens 64 --repetitions "${REPS:-10}" --out "$OUT/telemetry-overhead-c$1.json" 2>&1 | tail -4
  kill -TERM "$pid"; wait "$pid" 2>/dev/null
}
level 1 1.7 16
level 64 34 64
