"""A host identity for tests that build records without measuring one."""

from __future__ import annotations

from servelab.hardware import HostIdentity

TEST_HOST = HostIdentity(
    key="cpu-test-host-12345678",
    cpu_model="Test CPU",
    cpu_cores=2,
    cpu_threads=2,
    ram_bytes=8 * 2**30,
    os="Linux",
    kernel="6.0",
    machine="x86_64",
    accelerators=(),
)
