"""The Triton per-chunk step (split-K partials + one merge) against float64 reference attention.

On a GPU the kernels run compiled; without one (CI) the same kernels run on the CPU through
Triton's interpreter (TRITON_INTERPRET=1), which must be switched on before Triton compiles
anything, hence a subprocess. The interpreter mishandles bfloat16 (it has no numpy type), so
there bfloat16 is left to the GPU run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.kernels

pytest.importorskip("triton", reason="Triton is not installed")

# (T, Hq, Hkv, D, S, dtype, causal, window, softcap, key ranges, forced splits)
CASES = [
    (1, 8, 2, 64, 300, "float32", True, None, None, [(0, 130), (130, 300)], None),
    (3, 4, 1, 32, 200, "float32", True, 50, None, [(0, 64), (64, 200)], None),
    (2, 6, 2, 16, 97, "float32", False, None, 5.0, [(0, 97)], None),
    (1, 8, 2, 64, 300, "float16", True, None, None, [(0, 256), (256, 300)], 1),
    (5, 8, 8, 32, 150, "float16", True, None, None, [(0, 100), (100, 150)], None),
    (40, 4, 1, 16, 90, "float32", True, None, None, [(0, 45), (45, 90)], None),  # 160 rows
    (2, 4, 2, 16, 120, "float32", True, 8, None, [(0, 64), (64, 120)], None),  # masked range
    (1, 4, 4, 16, 0, "float32", True, None, None, [], None),  # nothing to attend
]
GPU_DTYPES = ("bfloat16", "float16", "float32")

SCRIPT = textwrap.dedent(
    """
    import json, math, sys, torch
    from servelab.kernels import paged_step_triton as dt
    from servelab.kernels.reference import reference_attention

    device = sys.argv[1]
    cases = json.loads(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    results = []
    for T, hq, hkv, d, S, dtype, causal, window, softcap, ranges, splits in cases:
        dtype = getattr(torch, dtype)
        q = torch.randn(T, hq, d, generator=g).to(dtype)
        k = torch.randn(S, hkv, d, generator=g).to(dtype)
        v = (torch.randn(S, hkv, d, generator=g) * 2).to(dtype)
        scale = 1 / math.sqrt(d)
        ref_o, ref_l = reference_attention(
            q.double(), k.double(), v.double(), scale=scale, causal=causal,
            q_start=S - T, window=window, softcap=softcap,
        )
        rows = hq // hkv * T
        rb = -(-rows // dt.block_rows(rows))
        bn, _ = dt.tile_config(d, q.element_size())
        cap = sum(splits or dt.splits_for(b - a, hkv, rb, bn) for a, b in ranges)
        parts = dt.Parts.allocate(cap, hkv, rows, d, torch.device(device))
        parts.out.fill_(float("nan"))
        qd, kd, vd = q.to(device), k.to(device), v.to(device)
        for a, b in ranges:
            dt.attend_parts(
                parts, qd, kd[a:b], vd[a:b], scale=scale, q_start=S - T, k_start=a,
                causal=causal, window=window, softcap=softcap, num_splits=splits,
            )
        out = torch.full_like(qd, float("nan"))
        lse = torch.full((T, hq), float("nan"), device=device)
        dt.merge_parts(parts, out, lse, hkv)
        out, lse = out.cpu().double(), lse.cpu().double()
        fin = torch.isfinite(ref_l)
        results.append({
            "out_err": (out - ref_o).abs().max().item() if out.numel() else 0.0,
            "lse_err": (lse[fin] - ref_l[fin]).abs().max().item() if fin.any() else 0.0,
            "inf_match": bool((torch.isneginf(lse) == torch.isneginf(ref_l)).all()),
            "nan": bool(out.isnan().any() or lse.isnan().any()),
            "empty_rows_zero": bool((out[~fin] == 0).all()),
            "parts": parts.used,
        })
    print(json.dumps(results))
    """
)


def _env(interpret: bool) -> dict[str, str]:
    """This process's environment, the repo's src first, Triton's interpreter on if asked."""
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(src), env.get("PYTHONPATH")]))
    return env


def _run(device: str, cases: list[list[object]], interpret: bool) -> list[dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, device, json.dumps(cases)],
        env=_env(interpret),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: list[dict[str, object]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _tolerance(dtype: str) -> float:
    # float32 products are IEEE; fp16/bf16 inputs are exact in the reference, so the error
    # is the probabilities' cast to the value dtype for P·V (|v| up to ~8 here).
    return {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}[dtype]


def _check(cases: list[list[object]], results: list[dict[str, object]]) -> None:
    for case, res in zip(cases, results, strict=True):
        dtype = str(case[5])
        assert not res["nan"], (case, res)
        assert res["inf_match"], (case, res)
        assert res["empty_rows_zero"], (case, res)
        assert float(res["out_err"]) <= _tolerance(dtype), (case, res)  # type: ignore[arg-type]
        assert float(res["lse_err"]) <= 1e-4, (case, res)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels instead")
def test_kernels_under_the_interpreter() -> None:
    cases = [list(c) for c in CASES]
    _check(cases, _run("cpu", cases, interpret=True))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu() -> None:
    cases = [list(c) for c in CASES]
    cases += [
        [1, 64, 8, 128, 5000, dt, True, None, None, [(0, 4096), (4096, 5000)], None]
        for dt in GPU_DTYPES
    ]
    cases += [[4, 32, 8, 256, 700, "bfloat16", True, 300, 30.0, [(0, 512), (512, 700)], 3]]
    _check(cases, _run("cuda", cases, interpret=False))  # type: ignore[arg-type]


def test_split_count_does_not_change_the_result_beyond_rounding() -> None:
    """One split and many splits fold the same keys: the outputs agree to float32 rounding."""
    if not torch.cuda.is_available():
        pytest.importorskip("numpy")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base: list[object] = [1, 8, 2, 64, 640, "float32", True, None, None, [(0, 640)]]
    results = _run(device, [[*base, 1], [*base, 10]], interpret=device == "cpu")
    assert abs(float(results[0]["out_err"]) - float(results[1]["out_err"])) < 1e-5  # type: ignore[arg-type]
    assert results[0]["parts"] == 1 and results[1]["parts"] == 10
    assert math.isfinite(float(results[1]["lse_err"]))  # type: ignore[arg-type]


STEPS_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from servelab.kernels import paged_plan, paged_steps
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 32, generator=g)
    k = torch.randn(300, 2, 32, generator=g)
    v = torch.randn(300, 2, 32, generator=g)
    mask = paged_plan.Mask(0.2, 298, True, 100, None)
    ranges = ((0, 200), (200, 300))
    torch_steps = paged_steps.TorchStep(q, 2, mask)
    triton_steps = paged_steps.TritonStep(q, 2, mask, [b - a for a, b in ranges])
    outs = []
    for steps in (torch_steps, triton_steps):
        for a, b in ranges:
            steps.attend(k[a:b], v[a:b], a)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((2, 8), float("nan"))
        steps.finish(out, lse)
        outs.append((out, lse))
    (oa, la), (ob, lb) = outs
    print(json.dumps([(oa - ob).abs().max().item(), (la - lb).abs().max().item()]))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_paged runs both steps on the GPU")
def test_paged_call_steps_agree_under_the_interpreter() -> None:
    """cpu_paged_attention's two chunk steps, driven the way the call drives them."""
    proc = subprocess.run(
        [sys.executable, "-c", STEPS_SCRIPT],
        env=_env(interpret=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out_err, lse_err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out_err < 2e-6 and lse_err < 2e-6
