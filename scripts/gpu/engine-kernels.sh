#!/usr/bin/env bash
# GPU machine (carry .gpu/engine-kernels, built here by scripts/gpu/bundle-engine-kernels.sh):
# vLLM's own TurboQuant Triton store and decode, from the bundled files, against servelab's
# quantizer and float64 attention, every preset (issue 20; docs/kernels-engine.md).
# Writes to $OUT: engine-kernels/<engine>-<card>.json (preset x check x verdict), the log,
# and JUnit XML.
set -euo pipefail
B=${B:-.gpu/engine-kernels}
OUT=${OUT:-results}
mkdir -p "$OUT/engine-kernels"
[ -f "$B/bundle/manifest.json" ] || { echo "no $B/bundle: run scripts/gpu/bundle-engine-kernels.sh first and carry $B" >&2; exit 2; }
python3 -c 'import pydantic' 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "$B"/wheels/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'
export PYTHONPATH=src SERVELAB_ENGINE_KERNELS="$PWD/$B/bundle" SERVELAB_ENGINE_KERNELS_OUT="$OUT/engine-kernels"
rc=0
python3 -m pytest -m engine_kernels tests/kernels/test_engine_*.py \
  -p no:cacheprovider -q -rfEsx --junitxml="$OUT/engine-kernels-junit.xml" 2>&1 | tee "$OUT/engine-kernels.log" || rc=$?
python3 - "$OUT/engine-kernels" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    rows = json.loads(f.read_text())["rows"]
    print(f"{f.name}: {len(rows)} rows")
    for r in rows:
        if r["verdict"] != "pass":
            fig = "" if r["figure"] is None else f"{r['figure']:.6g}"
            print(f"  {r['verdict']:6} {r['preset']:20} {r['check']:36} {fig} {r['threshold']}")
PY
exit $rc
