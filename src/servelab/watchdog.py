"""Session watchdogs: end a perf session cooperatively when the host is in danger or an
operator asks.

While a session runs, a thread checks about once a second:

- a ``STOP`` file in the results directory (the operator's stop switch);
- host available memory (``MemAvailable``) under the profiles' floor
  (``limits.min_free_memory_gib``), the lab's model-run memory watchdog;
- new fault lines in the kernel log (`servelab.receipts.parse_kernel_faults`), where the
  log is readable.

On the first trip it records the reason (``on_trip``, e.g. the session's invalid reasons)
and interrupts the main thread with a real signal, so a request blocked in a socket wait
ends at once: the handler raises KeyboardInterrupt, pytest ends the session as after Ctrl-C
(current test abandoned, fixtures torn down, engines stopped by their stop policy, partial
record written with the reason). Only the first trip interrupts; `stop` restores the handler.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from servelab.errors import interrupt_from_signal
from servelab.receipts import Probe, parse_mem_available_gib, read_kernel_faults, run_probe

STOP_FILE = "STOP"
INTERRUPT = signal.SIGUSR1


def _meminfo() -> str:
    try:
        return Path("/proc/meminfo").read_text()
    except OSError:
        return ""


class SessionWatchdog:
    """Checks every ``interval_s``; `start` and `stop` in the main thread."""

    def __init__(
        self,
        results_dir: Path,
        *,
        min_free_memory_gib: float | None = None,
        kernel_log: bool = False,
        since_s: float | None = None,
        interval_s: float = 1.0,
        on_trip: Callable[[str], None] | None = None,
        meminfo: Callable[[], str] = _meminfo,
        probe: Probe = run_probe,
    ) -> None:
        self.stop_file = results_dir / STOP_FILE
        self.min_free_memory_gib = min_free_memory_gib
        self.kernel_log = kernel_log
        self.since_s = time.monotonic() if since_s is None else since_s
        self.interval_s = interval_s
        self.on_trip = on_trip
        self.meminfo = meminfo
        self.probe = probe
        self.reason: str | None = None
        self._seen_faults: set[str] = set()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: Any = None
        self._main = threading.main_thread().ident

    # ---------------------------------------------------------------- checks
    def check(self) -> str | None:
        """The reason to stop now, or None."""
        if self.stop_file.exists():
            return (
                f"operator stop: {self.stop_file} exists (remove it to run again); "
                "the session was ended cooperatively"
            )
        if self.min_free_memory_gib is not None:
            mem = parse_mem_available_gib(self.meminfo())
            if mem is not None and mem < self.min_free_memory_gib:
                return (
                    f"memory watchdog: {mem:.2f} GiB of host memory available, under the floor "
                    f"of {self.min_free_memory_gib:g} GiB (limits.min_free_memory_gib); the "
                    "session was ended cooperatively"
                )
        if self.kernel_log:
            _, faults = read_kernel_faults(self.probe, self.since_s)
            new = [f for f in faults if f not in self._seen_faults]
            self._seen_faults.update(new)
            if new:
                return f"kernel-log fault during the run: {new[0]}; the session was ended"
        return None

    # ---------------------------------------------------------------- thread
    def start(self) -> None:
        if self._thread is not None:
            return
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(INTERRUPT, self._handle)
        self._thread = threading.Thread(target=self._loop, name="servelab-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 15)
            self._thread = None
        if self._previous is not None:
            signal.signal(INTERRUPT, self._previous)
            self._previous = None

    def __enter__(self) -> SessionWatchdog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._halt.is_set():
            reason = self.check()
            if reason is not None:
                self._trip(reason)
                return
            self._halt.wait(self.interval_s)

    def _trip(self, reason: str) -> None:
        self.reason = reason
        if self.on_trip is not None:
            self.on_trip(reason)
        if self._previous is not None and self._main is not None and not self._halt.is_set():
            signal.pthread_kill(self._main, INTERRUPT)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is None or self._halt.is_set():
            return
        self._halt.set()  # once: a second trip must not cut the teardown
        interrupt_from_signal(KeyboardInterrupt(f"servelab watchdog: {self.reason}"))
