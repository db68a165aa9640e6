#!/usr/bin/env bash
# Here (the machine with vLLM installed): gather what `scripts/gpu/engine-kernels.sh` needs on the
# GPU machine into .gpu/engine-kernels/ (git-ignored; a few MB, far under 64 MiB a command):
#   bundle/   ONLY the vLLM files vLLM's TurboQuant store and decode import (centroids.py,
#             config.py, triton_turboquant_store.py, triton_turboquant_decode.py,
#             triton_decode_attention.py; the backend turboquant_attn.py, read as text) plus three
#             shims, each file's SHA-256 in manifest.json (servelab.kernels.engine.bundle)
#   wheels/   pydantic's wheels for Python 3.12 (servelab's pytest plugin imports pydantic)
# Then it checks the bundle here: a clean interpreter loads the ops from it with the installed
# vLLM hidden, and the CPU tier of the conformance tests runs against it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.gpu/engine-kernels}
rm -rf "$DEST" && mkdir -p "$DEST/wheels"
"$PY" - "$DEST/bundle" <<'PY'
import sys
from pathlib import Path
from servelab.kernels.engine.bundle import build_bundle, unresolved_imports
b = build_bundle(Path(sys.argv[1]))
bad = unresolved_imports(b.root)
if bad:
    sys.exit(f"bundle-engine-kernels: imports the bundle cannot satisfy: {bad}")
print(f"bundle of {b.engine_version}: {len(b.manifest['files'])} engine files, "
      f"{len(b.manifest['shims'])} shims -> {b.root}")
PY
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST/wheels" pydantic pydantic-core annotated-types typing-inspection typing-extensions
# The installed vLLM cannot stand in: the driver loads vllm.* from the bundle only, or fails.
"$PY" -I src/servelab/kernels/engine/driver.py --imports-only "$DEST/bundle" > /dev/null
SERVELAB_ENGINE_KERNELS="$PWD/$DEST/bundle" "$PY" -m pytest -q -p no:cacheprovider \
  -m "engine_kernels and not slow" tests/kernels/test_engine_*.py
du -sh "$DEST"
