"""The fused Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

CI has no GPU; this runs the same kernel code (generic and 4-bit, every preset, the table and
operand-split variants) on small shapes, so a broken index or mask fails here too. The
interpreter must be switched on before Triton compiles anything, hence a subprocess.
"§2.8" is a section of docs/kernels-turboquant.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.kernels

pytest.importorskip("triton", reason="Triton is not installed")

SCRIPT = textwrap.dedent(
    """
    import json, math, torch
    from servelab.kernels.turboquant import KVCodec, unfused_decode_attention
    from servelab.kernels.turboquant import fused_config as cf
    from servelab.kernels.turboquant import fused_generic_triton as gen

    g = torch.Generator().manual_seed(0)
    b, h, t, d, hq = 2, 2, 150, 64, 6
    k = torch.randn(b, h, t, d, generator=g)
    v = torch.randn(b, h, t, d, generator=g) * 2
    q = torch.randn(b, hq, d, generator=g) * 2
    lens = torch.tensor([150, 77], dtype=torch.int32)
    cpu = torch.device("cpu")
    out = {}
    variants = {
        "generic": dict(generic=True),
        "generic-fast": dict(generic=True, precise_table=False),
    }
    for name in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_3bit_nc"):
        codec = KVCodec.build(name, d, "randomized_hadamard", seed=1)
        cache = codec.encode(k, v)
        consts = cf.DecodeConstants.build(codec, cpu)
        want = unfused_decode_attention(q, cache, codec, seq_lens=lens)
        p = codec.preset
        sm = 1 / math.sqrt(d)
        fp8 = p.key_format == "fp8"
        qk = q if fp8 else q.float() @ consts.rotation_t
        for label, kw in variants.items():
            if not name.endswith("4bit_nc") and label != "generic":
                continue
            cfg = cf.LaunchConfig(block_n=32, num_splits=3, **kw)
            got = torch.full((b, hq, d), float("nan"))
            gen.launch_generic(
                qk, gen.KMODE_FP8 if fp8 else gen.KMODE_CODEBOOK, 8 if fp8 else p.key_bits,
                p.key_code_bytes(d), cache.key_codes, cache.key_scales, gen.VMODE_UNIFORM,
                p.value_bits, p.value_code_bytes(d), cache.value_codes, cache.value_scale_zero,
                None if fp8 else consts.centroids, lens,
                sm * cf.LOG2E if fp8 else sm * cf.LOG2E / math.sqrt(d), got, t, h, cfg,
            )
            diff = (got.double() - want).abs()
            # raw max, and the excess over assert_close's atol + rtol·|want| at 1e-3 (§2.8)
            out[f"{name}/{label}"] = [float(diff.max()), float((diff - 1e-3 * want.abs()).max())]
    # The word kernel (fused_words_triton), on 4-bit keys and values and dense fp16.
    from servelab.kernels.turboquant.fused_words_triton import as_words, launch_words
    codec = KVCodec.build("turboquant_4bit_nc", d, "randomized_hadamard", seed=1)
    cache = codec.encode(k, v)
    consts = cf.DecodeConstants.build(codec, cpu)
    want = unfused_decode_attention(q, cache, codec, seq_lens=lens)
    qk = (q.float() @ consts.rotation_t).contiguous()
    for label, splits, precise in (
        ("words", 3, True), ("words-1split", 1, True), ("words-fast", 3, False)
    ):
        got = torch.full((b, hq, d), float("nan"))
        launch_words(qk, as_words(cache.key_codes), cache.key_scales,
                     as_words(cache.value_codes), cache.value_scale_zero, consts.centroids,
                     lens, cf.LOG2E / d, got, t, block_n=32, num_warps=4, num_stages=1,
                     num_splits=splits, precise_table=precise)
        diff = (got.double() - want).abs()
        out[f"turboquant_4bit_nc/{label}"] = [
            float(diff.max()), float((diff - 1e-3 * want.abs()).max())]
    kd = k.half()
    vd = v.half()
    got = torch.full((b, hq, d), float("nan"))
    launch_words(q, kd, None, vd, None, None, lens, cf.LOG2E / math.sqrt(d), got, t,
                 block_n=32, num_warps=4, num_stages=1, num_splits=4)
    from servelab.kernels.turboquant import reference_decode_attention
    out["dense-words-fp16"] = float((got.double() - reference_decode_attention(
        q, kd, vd, seq_lens=lens)).abs().max())
    got = torch.full((b, hq, d), float("nan"))
    gen.launch_generic(q, gen.KMODE_DENSE, 16, 2 * d, kd, None, gen.VMODE_DENSE, 16, 2 * d, vd,
                       None, None, lens, cf.LOG2E / math.sqrt(d), got, t, h,
                       cf.LaunchConfig(32, 4, 2, 3))
    from servelab.kernels.turboquant import reference_decode_attention
    out["dense-fp16"] = float((got.double() - reference_decode_attention(
        q, kd, vd, seq_lens=lens)).abs().max())
    print(json.dumps(out))
    """
)


def _accelerator_present() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (xpu is not None and xpu.is_available()))


@pytest.mark.skipif(
    _accelerator_present(),
    reason="a GPU is present: test_turboquant_fused runs the compiled kernels instead (the "
    "interpreter of Triton 3.6 with numpy 2.5 raised 'only 0-dimensional arrays can be "
    "converted to Python scalars' on the H100 machine, 2026-11-25)",
)
def test_fused_kernels_under_the_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 9
    # The dense fp16 paths round q and p to fp16 before the matrix unit: 2e-3, as on the GPU.
    assert errors.pop("dense-fp16") < 2e-3
    assert errors.pop("dense-words-fp16") < 2e-3
    for name, (_, excess) in errors.items():
        assert excess < 1e-3, f"{name}: max |fused − unfused| − 1e-3·|unfused| = {excess:.2e}"
    # With the table residue and the hi/lo operand split the kernels are near float32.
    for name in (
        "turboquant_k8v4/generic",
        "turboquant_3bit_nc/generic",
        "turboquant_4bit_nc/generic",
        "turboquant_4bit_nc/words",
        "turboquant_4bit_nc/words-1split",
    ):
        assert errors[name][0] < 1e-5, f"{name}: {errors[name][0]:.2e}"
    # Control: without the residue the error is visible, so the check above has power.
    assert errors["turboquant_4bit_nc/generic-fast"][0] > 1e-5
    assert errors["turboquant_4bit_nc/words-fast"][0] > 1e-5
