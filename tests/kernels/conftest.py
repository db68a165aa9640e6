"""Shared fixtures for `-m kernels` tests: the device, seeded generators, the grid option.

The device is the first of cuda, xpu, cpu that is available. Each test gets its own seed,
derived from its node id, so inputs are fresh per test and still reproducible.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# `--kernels-full` is registered by the servelab plugin (loaded by its entry point, or by
# the root conftest in a bare checkout), so it works from the repo root and from here alike.


def kernels_full(config: pytest.Config) -> bool:
    """Whether the full grid was asked for (False where the plugin is disabled)."""
    return bool(config.getoption("--kernels-full", default=False))


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def torch_gen(seed: int) -> torch.Generator:
    """A CPU generator: draw on the host, then move, so every device sees the same data."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def np_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def pytest_configure(config: pytest.Config) -> None:
    # Issue 20. Registered here until pyproject.toml's marker list carries it.
    config.addinivalue_line(
        "markers",
        "engine_kernels: an engine's own kernels (vLLM's TurboQuant) checked against servelab's "
        "references; SERVELAB_ENGINE_KERNELS=DIR names a bundle (scripts/gpu/"
        "bundle-engine-kernels.sh), else the installed vLLM is bundled on the fly",
    )


@pytest.fixture(scope="session")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's TurboQuant files: the bundle SERVELAB_ENGINE_KERNELS names, else the installed one."""
    from servelab.kernels.engine.bundle import (
        build_bundle,
        installed_engine_root,
        load_bundle,
        missing_engine_files,
    )

    named = os.environ.get("SERVELAB_ENGINE_KERNELS")
    if named:
        return load_bundle(Path(named))
    root = installed_engine_root()
    if root is None:
        pytest.skip(
            "no vLLM installed here and SERVELAB_ENGINE_KERNELS names no bundle "
            "(scripts/gpu/bundle-engine-kernels.sh builds one)"
        )
    missing = missing_engine_files(root)
    if missing:
        pytest.skip(f"the installed vLLM has no TurboQuant files: {', '.join(missing)}")
    return build_bundle(tmp_path_factory.mktemp("engine") / "bundle")


@pytest.fixture(scope="session")
def engine_report(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Rows of preset x check x verdict, saved at the end of the session (issue 20).

    Written to RESULTS_DIR/engine-kernels/<engine>__<device>.json (a worker suffix under
    xdist); SERVELAB_ENGINE_KERNELS_OUT overrides the folder (the GPU script points it at $OUT).
    """
    from servelab.kernels.engine.bundle import installed_engine_version, load_bundle
    from servelab.kernels.engine.report import Report

    named = os.environ.get("SERVELAB_ENGINE_KERNELS")
    engine = load_bundle(Path(named)).engine_version if named else installed_engine_version()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = Report(engine, device, meta={"torch": torch.__version__})
    yield report
    if not report.rows:
        return
    config = request.config
    folder = os.environ.get("SERVELAB_ENGINE_KERNELS_OUT")
    if folder:
        out = Path(folder)
    else:
        results = config.getoption("--results-dir", default=None) or "results"
        out = config.rootpath / str(results) / "engine-kernels"
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{report.engine}__{report.device}")
    path = report.save(out / f"{slug}{'-' + worker if worker else ''}.json")
    fails = sum(r.verdict == "fail" for r in report.rows)
    print(f"\nengine kernels: {len(report.rows)} rows, {fails} fail -> {path}")
