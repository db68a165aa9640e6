"""cuda_ext's build-and-cache machinery, on any machine.

CI has no nvcc, so these tests put a stand-in nvcc on the path: a script that answers
``--version`` and compiles the (plain C) source with the host's C compiler into the shared
library nvcc would write. It stands in for the one tool that is not here; what is tested is
servelab's side: where nvcc is looked for, the cache key (source, headers beside it, flags,
nvcc version), the atomic write, loading through ctypes, and the errors. The real kernels
are built by the real nvcc on the GPU machine (test_staging.py, test_turboquant_fused.py).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from servelab.kernels import cuda_ext

pytestmark = pytest.mark.kernels

FAKE_NVCC = """#!/usr/bin/env bash
# Stand-in for nvcc (see the module docstring): counts its builds, fails on a source that
# says BROKEN, else compiles the source as C with the host compiler.
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 0.0, stand-in"; exit 0; fi
out=""; src=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    *) src="$1"; shift ;;
  esac
done
echo build >> "$(dirname "$0")/builds.txt"
if grep -q BROKEN "$src"; then echo "stand-in: error in $src" >&2; exit 1; fi
echo "ptxas info    : Used 1 registers"
exec cc -shared -fPIC -x c -I "$(dirname "$src")" -o "$out" "$src"
"""

SOURCE = '#include "answer.cuh"\nint answer(void) { return ANSWER; }\n'


@pytest.fixture
def toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("the stand-in nvcc needs a host C compiler (cc)")
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("SERVELAB_CACHE", str(tmp_path / "cache"))
    return home


def builds(home: Path) -> int:
    f = home / "bin" / "builds.txt"
    return len(f.read_text().splitlines()) if f.exists() else 0


def sources(tmp_path: Path, answer: int) -> Path:
    src_dir = tmp_path / "csrc"
    src_dir.mkdir(exist_ok=True)
    (src_dir / "answer.cuh").write_text(f"#define ANSWER {answer}\n")
    src = src_dir / "answer.cu"
    src.write_text(SOURCE)
    return src


def test_nvcc_is_found_in_cuda_home(toolchain: Path) -> None:
    assert cuda_ext.find_nvcc() == str(toolchain / "bin" / "nvcc")


def test_a_build_is_loaded_cached_and_keyed_by_the_headers(toolchain: Path, tmp_path: Path) -> None:
    src = sources(tmp_path, 42)
    lib = cuda_ext.build("answer_a", src, "-arch=sm_90")
    assert lib.lib.answer() == 42
    assert lib.path.parent == tmp_path / "cache" / "cuda"
    assert "registers" in lib.log.read_text()  # nvcc's report kept beside the library
    assert builds(toolchain) == 1
    assert cuda_ext.build("answer_a", src, "-arch=sm_90").path == lib.path
    assert builds(toolchain) == 1, "a second build of the same sources must come from the cache"
    sources(tmp_path, 7)  # only the header changes
    changed = cuda_ext.build("answer_a", src, "-arch=sm_90")
    assert changed.path != lib.path and builds(toolchain) == 2
    assert changed.lib.answer() == 7
    other_arch = cuda_ext.build("answer_a", src, "-arch=sm_80")
    assert other_arch.path != changed.path and builds(toolchain) == 3
    leftovers = [p for p in (tmp_path / "cache" / "cuda").iterdir() if p.suffix == ".so"]
    assert len(leftovers) == 3, "each build is one library, no temporary files left behind"


def test_a_failed_build_says_why_and_leaves_no_library(toolchain: Path, tmp_path: Path) -> None:
    src = sources(tmp_path, 1)
    src.write_text(SOURCE + "BROKEN\n")
    with pytest.raises(cuda_ext.CudaBuildError, match=r"nvcc failed on answer\.cu"):
        cuda_ext.build("answer_b", src, "-arch=sm_90")
    assert not list((tmp_path / "cache" / "cuda").glob("*.so"))


def test_no_nvcc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cuda_ext, "find_nvcc", lambda: None)
    with pytest.raises(cuda_ext.CudaBuildError, match="nvcc not found"):
        cuda_ext.build("answer_c", sources(tmp_path, 1), "-arch=sm_90")


def test_enabled_only_for_cuda_devices_and_not_when_turned_off(
    toolchain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not cuda_ext.enabled(torch.device("cpu"))
    assert cuda_ext.enabled(torch.device("cuda"))  # nvcc is found; the device is not touched
    monkeypatch.setenv("SERVELAB_NO_CUDA_EXT", "1")
    assert not cuda_ext.enabled(torch.device("cuda"))
    monkeypatch.setenv("SERVELAB_NO_CUDA_EXT", "0")
    assert cuda_ext.enabled(torch.device("cuda"))


def test_the_shipped_sources_are_there() -> None:
    for name in ("tq4_decode.cu", "paged_gather.cu"):
        text = cuda_ext.source(name).read_text()
        assert "servelab_cuda_error" in text, f"{name} must export servelab_cuda_error"
    assert (cuda_ext.source("tq4_decode.cu").parent / "tq4_tiles.cuh").is_file()
    assert os.access(cuda_ext.source("tq4_decode.cu"), os.R_OK)
