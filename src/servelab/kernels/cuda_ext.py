"""Build servelab's CUDA sources with nvcc into a shared library, once, and load it with ctypes.

Why not a torch extension: a plain ``extern "C"`` library needs no torch headers, so it builds
in seconds, and a ctypes call costs microseconds where a Triton launch from Python costs a
tenth of a millisecond. Arguments cross as raw device pointers, 64-bit strides and the
caller's stream (``torch.cuda.current_stream().cuda_stream``), so launches land on torch's
stream and are captured by CUDA graphs like any other kernel.

The library is cached under ``$SERVELAB_CACHE/cuda`` (default ``~/.cache/servelab/cuda``),
keyed by the source and the headers beside it (``*.cuh``), the flags, the target architecture
and nvcc's version; nvcc's register report is kept beside it (``<name>-<key>.log``). nvcc is
looked up in ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``/usr/local/cuda/bin`` and ``PATH``.
``SERVELAB_NO_CUDA_EXT=1`` turns the CUDA kernels off (callers fall back to Triton).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from servelab.errors import CudaBuildError, KernelRuntimeError

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], ctypes.CDLL] = {}
_NVCC_VERSION: dict[str, str] = {}

__all__ = ["CudaBuildError", "Library", "build", "check", "enabled", "find_nvcc", "source"]


@dataclass(frozen=True)
class Library:
    lib: ctypes.CDLL
    path: Path
    log: Path


def find_nvcc() -> str | None:
    """nvcc's path, looked up once per setting of the variables that steer the search
    (``enabled`` runs on every decode call)."""
    env = os.environ
    return _find_nvcc(env.get("CUDA_HOME"), env.get("CUDA_PATH"), env.get("PATH"))


@functools.lru_cache(maxsize=8)
def _find_nvcc(cuda_home: str | None, cuda_path: str | None, path: str | None) -> str | None:
    for root in (cuda_home, cuda_path):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc", path=path)


def enabled(device: torch.device) -> bool:
    """True where a CUDA kernel of this package can be built and run on ``device``."""
    if device.type != "cuda" or os.environ.get("SERVELAB_NO_CUDA_EXT", "") not in ("", "0"):
        return False
    return find_nvcc() is not None


def cache_root() -> Path:
    base = os.environ.get("SERVELAB_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "servelab"
    return root / "cuda"


def arch_flag(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    # Hopper's accelerated features need the "a" target; nothing here uses them, so plain.
    return f"-arch=sm_{major}{minor}"


def _nvcc_version(nvcc: str) -> str:
    if nvcc not in _NVCC_VERSION:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
        _NVCC_VERSION[nvcc] = out.stdout.strip().splitlines()[-1] if out.stdout else "unknown"
    return _NVCC_VERSION[nvcc]


def build(name: str, source: Path, arch: str, extra_flags: tuple[str, ...] = ()) -> Library:
    """Compile ``source`` (one .cu file) for ``arch`` unless a cached build exists; load it."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError(
            f"cuda_ext.build({name}): nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, "
            "/usr/local/cuda/bin and PATH); install the CUDA toolkit or set CUDA_HOME, or set "
            "SERVELAB_NO_CUDA_EXT=1 to use the Triton kernels"
        )
    flags = (
        "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo",
        "-Xptxas", "-v", arch, *extra_flags,
    )  # fmt: skip
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.cuh")):  # what the source may include
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    digest.update("\0".join((*flags, _nvcc_version(nvcc))).encode())
    key = digest.hexdigest()[:16]
    root = cache_root()
    lib_path = root / f"{name}-{key}.so"
    log_path = root / f"{name}-{key}.log"
    with _LOCK:
        if (name, key) in _LOADED:
            return Library(_LOADED[(name, key)], lib_path, log_path)
        root.mkdir(parents=True, exist_ok=True)
        if not lib_path.is_file():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
            proc = subprocess.run(
                [nvcc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, check=False
            )
            log_path.write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise CudaBuildError(f"nvcc failed on {source.name} ({arch}):\n{tail}")
            os.replace(tmp, lib_path)  # atomic: a concurrent builder sees all or nothing
        lib = ctypes.CDLL(str(lib_path))
        _LOADED[(name, key)] = lib
        return Library(lib, lib_path, log_path)


def check(lib: ctypes.CDLL, rc: int, where: str) -> None:
    """Raise on a nonzero cudaError_t returned by a launcher. Every .cu file of this package
    exports ``const char* servelab_cuda_error(int)`` (cudaGetErrorString)."""
    if rc != 0:
        fn = lib.servelab_cuda_error
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_int]
        raise KernelRuntimeError(
            f"{where}: CUDA error {rc}: {fn(rc).decode(errors='replace')} (a launcher of "
            "servelab/kernels/csrc returned it; rerun with CUDA_LAUNCH_BLOCKING=1 to find the "
            "launch, or set SERVELAB_NO_CUDA_EXT=1 to fall back to Triton)"
        )


def source(name: str) -> Path:
    """A .cu file shipped in ``servelab/kernels/csrc``."""
    return Path(__file__).resolve().parent / "csrc" / name
