"""Engine identity: is the engine a profile needs installed here, and which version is it."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata

import httpx

from servelab.errors import EngineNotInstalledError
from servelab.profiles import Profile


class EngineExtraMissingError(EngineNotInstalledError):
    """The engine is installed, but not the optional modules it serves with
    (`EngineSpec.requires`, e.g. the `transformers-serve` extra): a profile that is an
    option, not the default, is skipped for it rather than failed."""


def require_engine(profile: Profile) -> str:
    """The installed engine's "distribution version" (a program: "name version"), or
    EngineNotInstalledError naming the install command."""
    e = profile.engine
    if e.binary is not None:
        return _require_binary(profile, e.binary)
    assert e.distribution is not None and e.module is not None  # profiles._check_semantics
    try:
        version = metadata.version(e.distribution)
    except metadata.PackageNotFoundError:
        version = None
    if version is None or importlib.util.find_spec(e.module) is None:
        raise EngineNotInstalledError(
            f"profile {profile.name!r} needs the engine {e.distribution!r} "
            f"(module {e.module!r}), which is not installed in this Python. "
            f"Install it with: {e.install_hint}"
        )
    missing = [m for m in e.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineExtraMissingError(
            f"profile {profile.name!r}: the engine {e.distribution} {version} is installed but "
            f"the module(s) {', '.join(missing)} it needs to serve are not (profile field "
            f"engine.requires). Install them with: {e.install_hint}"
        )
    return f"{e.distribution} {version}"


def _require_binary(profile: Profile, binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise EngineNotInstalledError(
            f"profile {profile.name!r} needs the program {binary!r} (engine "
            f"{profile.engine.name!r}), which is not on PATH here. Build or install it with: "
            f"{profile.engine.install_hint}"
        )
    return f"{profile.engine.name} {binary_version(path)}"


def binary_version(path: str, timeout_s: float = 20.0) -> str:
    """A program's `--version` (llama.cpp: "version: 0.5.0-dev (build 1, commit 0c1e570)" ->
    "0.5.0-dev (build 1, commit 0c1e570)"), or "version unknown"."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "version unknown"
    m = re.search(r"^version:?[ \t]*(\S[^\n]*)", out.stdout + out.stderr, re.MULTILINE)
    return m.group(1).strip() if m else "version unknown"


def remote_engine(base_url: str, headers: Mapping[str, str] | None = None) -> str:
    """Best-effort identity of an external server: vLLM answers GET /version."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/version", headers=headers, timeout=5.0)
        if r.status_code == 200:
            v = r.json().get("version")
            if isinstance(v, str):
                return f"vllm {v} (external)"
    except (httpx.HTTPError, ValueError):
        pass
    return "unknown engine (external endpoint)"
