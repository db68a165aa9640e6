"""Engine identity: is the engine a profile needs installed here, and which version is it."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from importlib import metadata

import httpx

from servelab.errors import EngineNotInstalledError
from servelab.profiles import Profile


def require_engine(profile: Profile) -> str:
    """The installed engine's "distribution version", or EngineNotInstalledError naming the
    install command."""
    try:
        version = metadata.version(profile.engine.distribution)
    except metadata.PackageNotFoundError:
        version = None
    if version is None or importlib.util.find_spec(profile.engine.module) is None:
        raise EngineNotInstalledError(
            f"profile {profile.name!r} needs the engine {profile.engine.distribution!r} "
            f"(module {profile.engine.module!r}), which is not installed in this Python. "
            f"Install it with: {profile.engine.install_hint}"
        )
    return f"{profile.engine.distribution} {version}"


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
