"""Host and stack identity (first cut: host key and accelerator presence)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key() -> str:
    """Stable key for "same machine kind": CPU model, core count, accelerators.

    Not the hostname: two identical CI machines must share baselines.
    """
    blob = f"{cpu_model()}|{os.cpu_count()}|{platform.machine()}"
    slug = "".join(c if c.isalnum() else "-" for c in platform.machine().lower())
    return f"cpu-{slug}-{os.cpu_count()}c-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def accelerator_available(kind: str, count: int) -> tuple[bool, str]:
    """Whether `count` accelerators of `kind` are present here, and why not."""
    if kind == "cpu":
        return True, ""
    if kind == "xpu":
        if shutil.which("xpu-smi") is None and shutil.which("sycl-ls") is None:
            return False, "no Intel XPU tooling (xpu-smi/sycl-ls) on this host"
        return True, ""
    if kind == "cuda":
        if shutil.which("nvidia-smi") is None:
            return False, "no NVIDIA driver (nvidia-smi) on this host"
        return True, ""
    return False, f"unknown accelerator kind {kind!r}"
