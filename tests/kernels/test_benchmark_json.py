"""``pytest -m kernels --benchmark-json`` works on a machine without CUDA and labels its figures.

The session runs in a subprocess with CUDA hidden and the repository's own pytest settings
(``filterwarnings = error`` included), as a user would run it; pytest-benchmark's JSON is read
back and every benchmark must carry its kernel's shape labels in ``extra_info``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels

REPO = Path(__file__).resolve().parents[2]
# What every micro-benchmark says about itself; the kernels add their own axes.
LABELS = {"kernel", "device", "dtype", "num_q", "q_heads", "head_size"}


def _disabled_plugins(config: pytest.Config) -> list[str]:
    """The ``-p no:NAME`` options of this session, for the child session (the GPU wrapper
    runs the kernel tests with ``-p no:servelab``)."""
    args, found = list(config.invocation_params.args), []
    for i, arg in enumerate(args):
        if arg == "-p" and i + 1 < len(args) and args[i + 1].startswith("no:"):
            found += ["-p", args[i + 1]]
        elif arg.startswith("-pno:"):
            found += ["-p", arg[2:]]
    return found


def test_benchmark_json_on_cpu_carries_shape_labels(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": ""}
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-m", "kernels", "-q", "-p", "no:cacheprovider",
            "tests/kernels/test_micro_benchmarks.py", "-k", "merge_states or cpu_paged",
            f"--benchmark-json={out}", *_disabled_plugins(request.config),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert set(by_name) == {"test_merge_states", "test_cpu_paged_attention"}
    for name, bench in by_name.items():
        info = bench["extra_info"]
        assert set(info) >= LABELS, f"{name} lacks {LABELS - set(info)}"
        assert info["device"] == "cpu"
        assert bench["stats"]["rounds"] >= 1 and bench["stats"]["median"] > 0
    paged = by_name["test_cpu_paged_attention"]["extra_info"]
    assert paged["kernel"] == "cpu_paged_attention"
    assert (paged["host_tokens"], paged["block_size"], paged["chunk_tokens"]) == (2048, 16, 512)
    assert paged["kv_heads"] == 2 and paged["context"] == 2048 + 16
