"""The b70 lab's profiles: they load, render the lab's exact command and environment, name
their hardware and patches, fit their own workloads, and skip cleanly without B70s."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from servelab import recall
from servelab.errors import QualityGateError
from servelab.profiles import load_profile
from servelab.quality import load_quality_file, resolve_quality_path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "fixtures" / "profiles"
EXPECTED = ROOT / "fixtures" / "expected"
LAB = ["minimax-m27-c1", "minimax-m27-c2", "minimax-m27-c4", "minimax-m27-c8", "gemma4-12b-c8"]
COMPILE = '{"use_inductor_graph_partition":true,"compile_sizes":[1],"cudagraph_mode":"PIECEWISE"}'


def expected(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXPECTED / f"{name}.json").read_text())
    return data


@pytest.mark.parametrize("name", LAB)
def test_renders_the_labs_exact_command(name: str) -> None:
    p = load_profile(PROFILES / f"{name}.toml")
    e = expected(name)
    argv = p.render_command(
        model=e["render"]["model"], host=e["render"]["host"], port=e["render"]["port"]
    )
    assert argv == e["argv"], shlex.join(argv)
    assert dict(p.engine.env) == e["env"]
    assert p.model.path == e["render"]["model"]


@pytest.mark.parametrize(
    ("name", "seqs", "offload"),
    [
        ("minimax-m27-c1", "1", None),
        ("minimax-m27-c2", "2", "16"),
        ("minimax-m27-c4", "4", "32"),
        ("minimax-m27-c8", "8", "64"),
    ],
)
def test_minimax_profiles_differ_only_where_the_lab_says(
    name: str, seqs: str, offload: str | None
) -> None:
    """b70-lab.md 4.1: common flags, then max-num-seqs and KV offload per profile."""
    argv = expected(name)["argv"]
    line = shlex.join(argv)
    assert argv[:3] == ["vllm", "serve", "/mnt/fast-ai/llm-models/minimax-m2.7-int4-autoround"]
    for flag in (
        "--trust-remote-code",
        "--no-enable-prefix-caching",
        "--tensor-parallel-size 4",
        "--distributed-executor-backend mp",
        "--max-model-len 32768",
        "--max-num-batched-tokens 512",
        "--gpu-memory-utilization 0.95",
        "--block-size 256",
        "--dtype float16",
        "--host 0.0.0.0",
        "--port 8000",
    ):
        assert flag in line, flag
    assert argv[argv.index("--compilation-config") + 1] == COMPILE
    assert argv[argv.index("--max-num-seqs") + 1] == seqs
    assert "--kv-cache-dtype" not in argv
    if offload is None:
        assert "--kv-offloading-size" not in argv
        assert "--no-scheduler-reserve-full-isl" not in argv
    else:
        assert argv[-3:] == ["--kv-offloading-size", offload, "--no-scheduler-reserve-full-isl"]


def test_gemma_slot_flags() -> None:
    argv = expected("gemma4-12b-c8")["argv"]
    line = shlex.join(argv)
    for flag in (
        "--dtype bfloat16",
        "--tensor-parallel-size 4",
        "--pipeline-parallel-size 1",
        "--max-model-len 32768",
        "--max-num-batched-tokens 4096",
        "--max-num-seqs 8",
        "--gpu-memory-utilization 0.95",
        "--kv-cache-dtype auto",
        "--enable-prefix-caching",
        "--trust-remote-code",
        "--host 127.0.0.1",
        "--port 18080",
    ):
        assert flag in line, flag
    assert "--quantization" not in argv and "--block-size" not in argv
    assert argv[-2:] == ["--limit-mm-per-prompt", '{"image":4}']
    env = expected("gemma4-12b-c8")["env"]
    assert env["XPU_GRAPH"] == "1" and env["VLLM_XPU_ENABLE_XPU_GRAPH"] == "1"


@pytest.mark.parametrize("name", LAB)
def test_hardware_patches_quality_and_shapes(name: str) -> None:
    p = load_profile(PROFILES / f"{name}.toml")
    assert (p.hardware.accelerator, p.hardware.count) == ("xpu", 4)
    assert "B70" in p.hardware.description
    assert p.readiness.timeout_s >= 600  # b70-lab.md 5: budget readiness at >= 10 min
    assert p.model.context_len == 32768
    for f in p.patches.files:
        path = (PROFILES / f).resolve()
        assert path.parent == (ROOT / "fixtures" / "patches" / "lab").resolve()
        assert path.is_file()
        assert path.name in (ROOT / "fixtures" / "patches" / "README.md").read_text()
    if name.startswith("minimax"):
        assert any("vllm-active-promoted-minimax-89tps" in f for f in p.patches.files)
        offload = "--kv-offloading-size" in p.engine.args
        assert offload == any("xpu-cpu-kv-worker-prototype" in f for f in p.patches.files)
        assert (p.workloads.session_cache is not None) == offload
    q = resolve_quality_path(p.quality.canaries, p.path)
    assert q is not None and load_quality_file(q).canaries
    shape = p.workloads.recall
    assert shape is not None
    recall.check_fits_estimate(
        lines=shape.lines,
        max_tokens=shape.max_tokens,
        context_len=p.model.context_len,
        profile=p.name,
    )


def test_fact_900_lines_needs_its_32k_context() -> None:
    p = load_profile(PROFILES / "minimax-m27-c2.toml")
    assert p.workloads.recall is not None and p.workloads.recall.lines == 900
    with pytest.raises(QualityGateError, match="profile 'minimax-m27-c2': recall workload of 900"):
        recall.check_fits_estimate(lines=900, max_tokens=4, context_len=16384, profile=p.name)


def test_args_hash_tells_profiles_apart() -> None:
    hashes = {load_profile(PROFILES / f"{n}.toml").args_hash() for n in LAB}
    assert len(hashes) == len(LAB)


def test_servelab_profiles_lists_every_profile_with_its_needs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "servelab.cli", "profiles"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for name in [*LAB, "cpu-smollm2"]:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        if name in LAB:
            assert "4x xpu" in line and "32768" in line


PROBE = """
import pytest
pytestmark = pytest.mark.perf

def test_probe(servelab_endpoint):
    pass

def test_gate(servelab_quality_gate):
    pass
"""


def test_lab_profiles_skip_cleanly_without_b70s(pytester: pytest.Pytester) -> None:
    if shutil.which("xpu-smi") or shutil.which("sycl-ls"):
        pytest.skip("this host has Intel XPU tooling")
    pytester.makepyfile(test_probe=PROBE)
    args = ["-p", "no:cacheprovider", "-rs", f"--profiles-dir={PROFILES}"]
    for name in LAB:
        args.append(f"--profile={name}")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(skipped=2 * len(LAB))
    result.stdout.fnmatch_lines([f"*profile '{n}' needs 4x xpu*" for n in LAB[:1]])


def test_recall_too_big_for_context_refused_before_start(pytester: pytest.Pytester) -> None:
    text = (PROFILES / "cpu-smollm2.toml").read_text()
    text = text.replace('name = "cpu-smollm2"', 'name = "tiny-ctx"')
    text = text.replace("context_len = 2048", "context_len = 512")
    text = text.replace(
        'canaries = "../quality/cpu-smollm2.toml"',
        f'canaries = "{ROOT / "fixtures" / "quality" / "cpu-smollm2.toml"}"',
    )
    d = pytester.mkdir("profiles")
    (d / "tiny-ctx.toml").write_text(text)
    pytester.makepyfile(test_probe=PROBE)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--profiles-dir={d}", "--profile=tiny-ctx", "-k", "gate"
    )
    # Refused when the profile loads, before pytest collects anything or a server starts.
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*tiny-ctx.toml: workload recall needs * tokens but model.context_len is 512*"]
    )
    assert not (pytester.path / "results" / "logs" / "server-tiny-ctx.log").exists()
