#!/usr/bin/env bash
# GPU machine (carry .gpu/b), after stage-a.sh on the same warm machine: the client at GPU
# rates against llama-server on the card (issue 16 item 5), outside pytest, so several
# shapes of the shared runs fit one command: benchmarks/client_rates.py --base-url with the
# cuda-llamacpp-smollm2 profile's server.
#   usage: OUT=... scripts/gpu/client-rates.sh ["LEVELS"] ["WAVES"] [extra client_rates args...]
#   e.g.   scripts/gpu/client-rates.sh "64" "1 2 4" --runs 5
set -uo pipefail
source scripts/gpu/stage-b.sh
export PYTHONPATH=$PYTHONPATH:$PWD
LEVELS=${1:-64 256}
WAVES=${2:-2}
shift 2 || shift $#
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
serve_llama 18182 "$OUT/rates-server.log" || exit 1
# shellcheck disable=SC2086
timeout "${RATES_TIMEOUT:-480}" python3 benchmarks/client_rates.py --base-url http://127.0.0.1:18182 \
  --profile cuda-llamacpp-smollm2 --levels $LEVELS --waves $WAVES --json "$OUT/client-rates.json" "$@"
rc=$?
kill -TERM "$llama_pid"; wait "$llama_pid"
exit "$rc"
