"""Shared fixtures for `-m kernels` tests: the device, seeded generators, the grid option.

The device is the first of cuda, xpu, cpu that is available. Each test gets its own seed,
derived from its node id, so inputs are fresh per test and still reproducible.
"""

from __future__ import annotations

import zlib

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
