"""vLLM's own TurboQuant (codebooks, presets, Triton store and decode) against servelab's.

Two tiers (docs/kernels-engine.md):
- fast, ``-m kernels`` and ``-m engine_kernels``: the bundle of vLLM's files is closed under
  the ops' imports and loads with the installed vLLM hidden; codebooks, the preset table and
  bytes per token·head from the engine's own files;
- ``-m engine_kernels`` only (also ``slow``): the engine's Triton store and decode, run once
  per session by ``servelab.kernels.engine.driver`` in a clean interpreter, on the GPU where
  there is one, else in Triton's interpreter on the CPU.
Every check adds a row to the session's report (``results/engine-kernels/*.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from servelab.kernels.engine import cases as engine_cases
from servelab.kernels.engine import checks, driver
from servelab.kernels.engine.bundle import (
    BACKEND_FILE,
    ENGINE_FILES,
    SHIMS,
    backend_lines,
    unresolved_imports,
)
from servelab.kernels.engine.report import Report, Row
from servelab.kernels.turboquant import PRESETS

pytestmark = pytest.mark.engine_kernels

D = 128
NAMES = tuple(PRESETS)
DECODE_CASES = ("random", "random_fp16")
CASES = (*DECODE_CASES, "constant", "hadamard_rows", "value_offset", "fp8_out_of_range")
# The Triton interpreter (3.9) converts fp32 to fp8e4nv without the carry into the exponent
# (0.4999 -> 0.25, not 0.5) and flushes subnormals (0.0016 -> 0): its FP8 bytes are not the
# GPU's. Found by this suite; the FP8 rows stay in the report, the tests xfail there.
INTERPRETER_FP8 = (
    "Triton's interpreter rounds fp32 -> fp8e4nv without carrying into the exponent "
    "(0.4999 -> 0.25): the FP8 bytes are the interpreter's, not the engine's"
)


def _add(report: Report, rows: list[Row]) -> list[Row]:
    for r in rows:
        report.add(r)
    return rows


def _failed(rows: list[Row]) -> list[str]:
    return [r.line() for r in rows if r.verdict == "fail"]


@pytest.fixture(scope="session")
def static(engine_bundle: Any) -> dict[str, Any]:
    return driver.static_records(engine_bundle.root, D, list(NAMES))


@pytest.mark.kernels
def test_bundle_holds_only_what_the_ops_import(engine_bundle: Any) -> None:
    root = engine_bundle.root
    assert unresolved_imports(root) == []
    files = {str(p.relative_to(root)) for p in root.rglob("*.py")}
    copied = {*ENGINE_FILES, BACKEND_FILE}
    assert copied <= files
    assert set(SHIMS) <= files
    # Everything else is an empty package marker written by the bundler.
    for rel in files - copied - set(SHIMS):
        assert (root / rel).read_text().startswith('"""servelab shim'), rel
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 1 << 20  # far under the 64 MiB a device command carries


@pytest.mark.kernels
def test_backend_setup_is_what_the_driver_repeats(engine_bundle: Any) -> None:
    """The driver repeats the backend's set-up (Hadamard as Pi and PiT, centroids, midpoints)."""
    found = backend_lines(engine_bundle.root, driver.BACKEND_SETUP_LINES)
    assert all(found.values()), {k: v for k, v in found.items() if not v}


@pytest.mark.kernels
def test_bundle_imports_with_the_installed_engine_hidden(engine_bundle: Any) -> None:
    """A clean interpreter (-I) loads the ops from the bundle; vllm from elsewhere fails."""
    proc = subprocess.run(
        [sys.executable, "-I", driver.__file__, "--imports-only", str(engine_bundle.root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "vllm.v1.attention.ops.triton_turboquant_decode" in loaded
    root = str(engine_bundle.root.resolve())
    assert all(f is not None and f.startswith(root) for f in loaded.values()), loaded


@pytest.mark.kernels
@pytest.mark.parametrize("name", NAMES)
def test_codebook_against_lloyd_max(
    name: str, static: dict[str, Any], engine_report: Report
) -> None:
    rows = {
        r.check: r
        for r in _add(engine_report, checks.check_codebook(name, D, static["presets"][name]))
    }
    assert rows["midpoints_are_midpoints"].verdict == "pass"
    assert rows["codebook_distortion"].verdict == "pass", rows["codebook_distortion"].line()
    # Known mismatch (docs/kernels-engine.md): vLLM integrates each cell with a 200-point
    # trapezoid, which leaves its centroids 1.6e-3 (3-bit) / 1.7e-3 (4-bit) from the Lloyd–Max
    # solution in √d·c units, past §2.8's 1e-3; the report keeps that row as "fail". Here the
    # gap must not grow: 2.5e-3 is the measured gap plus half.
    gap = rows["codebook_vs_gaussian_lloyd_max"].figure
    assert gap is not None and gap <= 2.5e-3, rows["codebook_vs_gaussian_lloyd_max"].line()


@pytest.mark.kernels
@pytest.mark.parametrize("name", NAMES)
def test_preset_table_and_bytes(name: str, static: dict[str, Any], engine_report: Report) -> None:
    rows = _add(
        engine_report,
        checks.check_preset_table(name, D, static["presets"][name], static["tq_presets"]),
    )
    assert not _failed(rows), _failed(rows)


# ---- the Triton store and decode (slow on the CPU: Triton's interpreter) ----


def _build_cases(on_gpu: bool) -> dict[str, engine_cases.Case]:
    rc = engine_cases.random_case
    f16 = torch.float16
    if on_gpu:
        cases = [
            rc("random", 20, 4, 4, 20, 512, D, [512, 300, 77, 1]),
            rc("random_fp16", 22, 2, 8, 32, 1024, D, [1024, 513], dtype=f16),
        ]
    else:  # Triton's interpreter: small shapes, fewer splits
        cases = [
            rc("random", 20, 2, 1, 3, 32, D, [32, 19], splits=8),
            rc("random_fp16", 22, 1, 1, 4, 32, D, [29], splits=8, dtype=f16),
        ]
    cases += engine_cases.adversarial_cases(D, 21, tokens=64 if on_gpu else 16)
    return {c.name: c for c in cases}


@pytest.fixture(scope="session")
def engine_run(engine_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    cases = _build_cases(on_gpu)
    work = tmp_path_factory.mktemp("engine-run")
    spec = {
        "device": "cuda" if on_gpu else "cpu",
        "head_size": D,
        "presets": list(NAMES),
        "cases": {n: c.engine_inputs() for n, c in cases.items()},
    }
    torch.save(spec, work / "spec.pt")
    env = dict(os.environ)
    if not on_gpu:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            driver.__file__,
            str(engine_bundle.root),
            str(work / "spec.pt"),
            str(work / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"the engine driver failed:\n{proc.stderr[-4000:]}")
    out: dict[str, Any] = torch.load(work / "out.pt", weights_only=False)
    out["case_objects"] = cases
    if out["kernel_skip"]:
        pytest.skip(f"engine Triton kernels not run: {out['kernel_skip']}")
    return out


def _case(
    engine_run: dict[str, Any], name: str, case: str
) -> tuple[engine_cases.Case, dict[str, Any], dict[str, Any]]:
    c = engine_run["case_objects"][case]
    rec = engine_run["presets"][name]
    return c, rec, rec["cases"][case]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_store_against_servelab(
    name: str, case: str, engine_run: dict[str, Any], engine_report: Report
) -> None:
    c, rec, res = _case(engine_run, name, case)
    rows = _add(engine_report, checks.check_store(name, c, rec, res["cache"]))
    failed = _failed(rows)
    if failed and rec["key_fp8"] and engine_run["interpreter"]:
        pytest.xfail(INTERPRETER_FP8)
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_decode_against_float64(
    name: str, case: str, engine_run: dict[str, Any], engine_report: Report
) -> None:
    c, rec, res = _case(engine_run, name, case)
    rows = _add(engine_report, checks.check_decode(name, c, rec, res["cache"], res["decode"]))
    failed = _failed(rows)
    if failed and rec["key_fp8"] and engine_run["interpreter"]:
        pytest.xfail(INTERPRETER_FP8)
    assert not failed, failed
