# Sourced by the *_device.sh scripts (repo root, on the GPU machine, OUTDIR as $1): the output
# folder, the card's identity and the date, nvcc on PATH and its version, and the repo
# installed in place (PYTHONPATH=src if that fails). Sets $out.
set -u -o pipefail
out=${1:?output folder}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
date -u +%FT%TZ | tee "$out/date.txt"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvcc --version 2>&1 | tail -1 | tee "$out/nvcc.txt"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
  echo "pip install -e failed (see pip.log); falling back to PYTHONPATH=src"
  export PYTHONPATH=src
fi
