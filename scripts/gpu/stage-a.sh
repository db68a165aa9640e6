#!/usr/bin/env bash
# GPU machine, first command (carry .gpu/a): build llama-server with CUDA from llama.cpp's
# tree (about 5.5 min on 16 cores for sm_90) into $SL, and keep the first half of the model
# wheel there. $SL lies outside the checkout, so it survives while the machine stays warm.
# With .gpu/a/llama-server.xz.part-* present (brought back by an earlier build), the build is
# skipped.
# FlashAttention kernels are off by default (LLAMA_CUDA_FA=ON builds them): their 82 template
# instances are about half of the CUDA sources, and a lent machine's minutes are few; a
# record's stack names the llama.cpp commit, and BENCHMARKS.md the flags.
set -euo pipefail
SL=${SL:-/opt/servelab-gpu}
ARCH=${CUDA_ARCH:-90}
mkdir -p "$SL"
cp .gpu/a/*.part1 .gpu/a/endpoint_request_func.py "$SL"/
cp -r .gpu/a/wheels "$SL"/
if ls .gpu/a/llama-server.xz.part-* > /dev/null 2>&1; then
  mkdir -p "$SL/llama.cpp/build/bin"
  cat .gpu/a/llama-server.xz.part-* \
    | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' \
    > "$SL/llama.cpp/build/bin/llama-server"
  chmod +x "$SL/llama.cpp/build/bin/llama-server"
  "$SL/llama.cpp/build/bin/llama-server" --version 2>&1 | head -1
  exit 0
fi
rm -rf "$SL/llama.cpp" && tar -xzf .gpu/a/llama.cpp.tar.gz -C "$SL"
cd "$SL/llama.cpp"
t0=$(date +%s)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA_FA="${LLAMA_CUDA_FA:-OFF}" > "$SL/cmake.log" 2>&1
cmake --build build --target llama-server -j "$(nproc)" > "$SL/build.log" 2>&1 \
  || { tail -40 "$SL/build.log"; exit 1; }
echo "llama-server built in $(( $(date +%s) - t0 )) s: $("$SL/llama.cpp/build/bin/llama-server" --version 2>&1 | head -1)"
# One static program: it travels back (xz, in parts of at most 15 MiB) so a later machine
# skips the build (scripts/gpu/stage-a.sh --prebuilt).
if [ -n "${OUT:-}" ]; then
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.stdout.buffer, "wb", preset=6))' \
    "$SL/llama.cpp/build/bin/llama-server" | split -b 15M - "$OUT/llama-server.xz.part-"
  ls -la "$OUT"
fi
