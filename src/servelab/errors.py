"""One exception hierarchy for servelab.

Every message says what was wrong, where (file, field, profile, argument) and what to do.
"""

from __future__ import annotations

import asyncio


class ServelabError(Exception):
    """Root of every error servelab raises on purpose."""


class ConfigError(ServelabError):
    """A command-line option or a configuration value is wrong."""


class ProfileError(ConfigError):
    """A profile file is missing, malformed or inconsistent."""


class EngineNotInstalledError(ServelabError):
    """The serving engine a profile needs is not importable here."""


class ModelPrepareError(ServelabError):
    """A model directory could not be prepared or verified."""


class ServerError(ServelabError):
    """The server under test failed to start, died, or could not be stopped cleanly."""


class ClientError(ServelabError):
    """The load generator itself could not run (not a failed request: those are data)."""


class BaselineError(ServelabError):
    """A stored baseline is corrupt, of an unknown schema, or not comparable."""


class QualityGateError(ServelabError):
    """A quality gate input (canary file, recall workload) is malformed."""


class KernelInputError(ServelabError, ValueError):
    """A kernel argument has the wrong shape, dtype, device or layout (raised before launch)."""


class RecordError(ServelabError):
    """A saved record is missing, corrupt or of an unknown schema."""


class KernelRuntimeError(ServelabError, RuntimeError):
    """A kernel could not run although its arguments passed the checks: a CUDA launch
    returned an error, a buffer sized up front was too small, an iteration did not converge."""


class CudaBuildError(KernelRuntimeError):
    """nvcc is missing or failed on one of servelab's CUDA sources; the message holds the
    end of its output."""


def interrupt_from_signal(stop: KeyboardInterrupt) -> None:
    """Raise `stop` from a signal handler (SIGTERM, SIGHUP, the session watchdog's signal).

    Inside a running event loop (a workload's asyncio.run) it is raised between two of the
    loop's callbacks, not at whatever bytecode the signal lands on: raised right after a
    coroutine object was made (aiohttp leaves its connect timeout with one), it stranded
    `Timeout.__aexit__` never awaited, and that warning ended an interrupted session with exit
    1 instead of 2. `call_soon_threadsafe` wakes a loop asleep in select."""
    try:
        asyncio.get_running_loop().call_soon_threadsafe(_raise, stop)
    except RuntimeError:  # no loop running here, or it is closing
        raise stop from None


def _raise(exc: BaseException) -> None:
    raise exc
