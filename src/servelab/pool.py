"""One managed server per profile per pytest session, shared by every perf test.

Without pytest-xdist the pool simply keeps the servers it started. With xdist, the controller
makes a shared folder and hands it to the workers: the first worker to need a profile starts
it under a file lock and writes its state there; the others attach to it. Workers never stop
a shared server (one worker finishing early must not take it from the others); the
controller stops every server in the folder, by process group, when the session ends.
Nothing is started once per worker.

The same folder carries the rest of what the processes of one session share
(`servelab.xdist`), in files read and written with `read_state` / `write_state`.

While the pool has servers, SIGTERM and SIGHUP (a CI timeout or cancel, a closed terminal)
end the session the way Ctrl-C does (`TerminationSignals`): pytest tears the fixtures down,
the servers are stopped and the partial record says ``"interrupted": true``. A pytest killed
outright (``kill -9``) is covered by each server's watchdog (`servelab.server`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from servelab.errors import ServerError, interrupt_from_signal
from servelab.models import PreparedModel, prepare_model
from servelab.profiles import Profile
from servelab.server import (
    Endpoint,
    ManagedServer,
    group_members,
    log_tail,
    served_model,
    terminate_group,
)
from servelab.stop_policy import StopRecord


@dataclass(frozen=True)
class Started:
    endpoint: Endpoint
    model: PreparedModel
    startup_seconds: float | None
    pid: int
    command: tuple[str, ...]


class TerminationSignals:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread while installed.

    Only the first signal raises: a second one (a CI runner repeating its SIGTERM) must not
    cut the teardown that the first one started. `restore` puts the previous handlers back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[signal.Signals, Any] = {}
        self.received: str | None = None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Install the handlers (once; a no-op outside the main thread, where Python
        delivers no signals)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signal.Signals(signum).name
        interrupt_from_signal(
            KeyboardInterrupt(
                f"{self.received} received: stopping the servers and writing the partial record"
            )
        )


class ServerPool:
    def __init__(
        self,
        log_dir: Path,
        *,
        cache_dir: Path | None = None,
        shared_dir: Path | None = None,
        startup_timeout_s: float | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.cache_dir = cache_dir
        self.shared_dir = shared_dir
        self.startup_timeout_s = startup_timeout_s
        self._owned: dict[str, ManagedServer] = {}
        self._started: dict[str, Started] = {}
        self._bases: dict[str, str] = {}  # card-count variant -> its profile (servelab.cards)
        self.signals = TerminationSignals()
        #: How each engine this pool stopped went, by profile (`close` fills it).
        self.stops: dict[str, StopRecord] = {}

    # -------------------------------------------------------------- public
    def get(self, profile: Profile) -> Started:
        if profile.name in self._started:
            self.ensure_alive(profile)
            return self._started[profile.name]
        self.signals.install()  # before the start: a signal during it must stop it too
        self._free_cards_of(profile)
        started = self._start(profile) if self.shared_dir is None else self._get_shared(profile)
        self._started[profile.name] = started
        base = None if profile.cards is None else profile.cards.base
        if base is not None:
            self._bases[profile.name] = base
        return started

    def _free_cards_of(self, profile: Profile) -> None:
        """A card-count variant (`NAME@2cards`) needs the cards its siblings hold: stop every
        started sibling first, by its stop policy (its StopRecord joins `stops`)."""
        base = None if profile.cards is None else profile.cards.base
        if base is None:
            return
        if self.shared_dir is not None:
            raise ServerError(
                f"profile {profile.name!r} is a card-count variant of {base!r}: its variants "
                "take turns on the same cards, which xdist workers cannot coordinate; run "
                "the perf tests without -n"
            )
        for name in [n for n, b in self._bases.items() if b == base and n != profile.name]:
            self._release(name)
            del self._started[name], self._bases[name]
            self._owned.pop(name, None)

    def ensure_alive(self, profile: Profile) -> None:
        started = self._started.get(profile.name)
        if started is None:
            return
        server = self._owned.get(profile.name)
        if server is not None:
            server.ensure_alive()
        elif not group_members(started.pid):
            raise ServerError(
                f"profile {profile.name!r}: the engine process group {started.pid} is gone. "
                f"Log {started.endpoint.log_path}, last lines:\n"
                f"{log_tail(started.endpoint.log_path)}"
            )

    def engine_pids(self, profile: Profile) -> list[int]:
        """Live pids of the engine serving ``profile`` in this session (started here or by
        another xdist worker); empty before any start."""
        started = self._started.get(profile.name)
        if started is not None:
            return group_members(started.pid)
        if self.shared_dir is not None:
            state = read_state(self._state_path(profile.name))
            if state is not None:
                return group_members(int(state["pid"]))
        return []

    def close(self) -> None:
        errors: list[str] = []
        try:
            for name in list(self._started):
                try:
                    self._release(name)
                except ServerError as exc:
                    errors.append(str(exc))
            self._started.clear()
            with warnings.catch_warnings():
                # A worker that started a shared server drops its Popens while the server runs
                # on for the others (the controller stops it): not the leak ResourceWarning means.
                warnings.simplefilter("ignore", ResourceWarning)
                self._owned.clear()
        finally:
            self.signals.restore()
        if errors:
            raise ServerError("teardown failed: " + "; ".join(errors))

    # -------------------------------------------------------------- internals
    def _start(self, profile: Profile) -> Started:
        model = prepare_model(profile, self.cache_dir)  # before the startup clock
        server = ManagedServer(
            profile,
            model.path,
            self.log_dir,
            startup_timeout_s=self.startup_timeout_s,
            # A shared server outlives the worker that started it: it goes with the controller
            # (the workers' parent process), which stops it at session end.
            owner_pid=os.getppid() if self.shared_dir is not None else os.getpid(),
        )
        try:
            endpoint = server.start()
        finally:
            # A start that fails stops the engine by its policy: an engine's stop like any other.
            if server.stop_record is not None:
                self.stops[profile.name] = server.stop_record
        self._owned[profile.name] = server
        assert server.pid is not None and server.port is not None
        return Started(
            endpoint, model, server.startup_seconds, server.pid, tuple(server.command(server.port))
        )

    def _state_path(self, name: str) -> Path:
        assert self.shared_dir is not None
        return self.shared_dir / f"server-{name}.json"

    def _get_shared(self, profile: Profile) -> Started:
        from filelock import FileLock

        assert self.shared_dir is not None
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        state_path = self._state_path(profile.name)
        with FileLock(str(state_path) + ".lock"):
            state = read_state(state_path)
            if state is not None and group_members(int(state["pid"])):
                model = prepare_model(profile, self.cache_dir)
                endpoint = Endpoint(
                    base_url=str(state["base_url"]),
                    model=served_model(profile, model.path),
                    profile=profile,
                    managed=True,
                    log_path=Path(str(state["log_path"])),
                    model_path=model.path,
                )
                return Started(endpoint, model, None, int(state["pid"]), tuple(state["command"]))
            started = self._start(profile)
            write_state(
                state_path,
                {
                    "pid": started.pid,
                    "port": self._owned[profile.name].port,
                    "base_url": started.endpoint.base_url,
                    "log_path": str(started.endpoint.log_path),
                    "command": list(started.command),
                    "owner": os.getpid(),
                },
            )
            return started

    def _release(self, name: str) -> None:
        started = self._started[name]
        server = self._owned.get(name)
        if self.shared_dir is None:
            if server is not None:
                record = server.stop()
                if record is not None:
                    self.stops[name] = record
            return
        # Shared: the controller stops it (stop_shared); only close the owner's log handle.
        del started
        if server is not None:
            server.detach()


def read_state(path: Path) -> dict[str, Any] | None:
    """A JSON object saved in the shared folder; None where it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Save a JSON object in the shared folder, replacing any earlier one atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def stop_shared(
    shared_dir: Path,
    profiles: Mapping[str, Profile] | None = None,
    errors: list[str] | None = None,
) -> dict[str, StopRecord]:
    """Stop every server the workers of one xdist session started (run by the controller),
    each by its profile's stop policy and stop timeout (``profiles`` by name; a server whose
    profile is not given: SIGTERM, then SIGKILL after 30 s), and return how each stopped.
    A stopped server's state file is removed, so a second call stops nothing twice. A server
    that could not be stopped cleanly raises ServerError after the others were stopped, or,
    where ``errors`` is given, is described there and the others' records are returned."""
    from filelock import FileLock

    records: dict[str, StopRecord] = {}
    failed: list[str] = []
    for state_path in sorted(shared_dir.glob("server-*.json")):
        with FileLock(str(state_path) + ".lock"):
            state = read_state(state_path)
            if state is None:
                continue
            name = state_path.stem.removeprefix("server-")
            profile = (profiles or {}).get(name)
            try:
                pid, port = int(state["pid"]), int(state["port"])
                records[name] = terminate_group(
                    pid,
                    port=port,
                    timeout_s=30.0 if profile is None else profile.readiness.stop_timeout_s,
                    what=f"profile {name!r}",
                    spec=None if profile is None else profile.stop,
                    profile=name,
                    base_url=str(state.get("base_url") or "") or None,
                )
            except ServerError as exc:
                failed.append(str(exc))
            state_path.unlink(missing_ok=True)
    if errors is not None:
        errors += failed
    elif failed:
        raise ServerError("teardown failed: " + "; ".join(failed))
    return records
