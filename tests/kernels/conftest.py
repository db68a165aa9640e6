"""Shared fixtures for `-m kernels` tests: the device, seeded generators, the grid option.

The device is the first of cuda, xpu, cpu that is available. Each test gets its own seed,
derived from its node id, so inputs are fresh per test and still reproducible.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    # pytest only asks conftests it loads at start-up for options: this one when the command
    # line names tests/kernels. A bare `pytest -m kernels --kernels-full` from the repo root
    # needs the option registered by the servelab plugin too; then this one steps aside.
    with contextlib.suppress(ValueError):  # already registered by the plugin
        parser.addoption(
            "--kernels-full",
            action="store_true",
            default=False,
            help="run the full kernel test grid (32,768-token contexts, every axis combined)",
        )


def kernels_full(config: pytest.Config) -> bool:
    """Whether the full grid was asked for (False where the option is not registered)."""
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
