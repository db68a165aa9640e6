# Over 400 lines: start, readiness, stop by policy and the owner-death watchdog are one lifecycle.
"""Server lifecycle: start a profile's engine in its own process group, wait until it really
serves, and tear the whole group down again, verifying that nothing survives.

The constructor only stores configuration; `start()` is explicit. Any failure during start
kills the group before the error is raised (vLLM's test server leaks it when the health wait
fails). Processes are killed by process group id, never by name.

The engine runs in its own session, so nothing sent to pytest reaches it. A small watchdog
(`WATCHDOG_SOURCE`, standard library only) beside it terminates the group when the process
that owns the server dies without stopping it (``kill -9``, the OOM killer); a SIGTERM or
SIGHUP to pytest is turned into an orderly teardown by `servelab.pool.TerminationSignals`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from servelab.engine_traits import traits_of
from servelab.errors import ServerError
from servelab.profiles import Profile
from servelab.stop_policy import StopRecord, StopSpec, stop_group

LOG_TAIL_LINES = 40
DRAINING: list[object] = []  # Popens of engines a stop policy left draining (kept alive)


@dataclass(frozen=True)
class Endpoint:
    """Where measurements are sent: a managed server or an external one."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    model: str  # served model name
    profile: Profile | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    managed: bool = False
    log_path: Path | None = None
    # The served model's files on this machine (a managed server's prepared model; None for
    # an external endpoint): where a local tokenizer is read for an engine without /tokenize.
    model_path: Path | None = None

    @property
    def api_base(self) -> str:
        return self.base_url.rstrip("/") + "/v1"


def served_model(profile: Profile, model_path: Path) -> str:
    """The `model` a request must name: the profile's served name, or the model path itself
    for an engine that answers only to it (`EngineTraits.model_is_path`)."""
    return str(model_path) if traits_of(profile).model_is_path else profile.model.served_name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(log is empty)"


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (from /proc; zombies excluded)."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] != "Z":
            members.append(int(entry.name))
    return members


class ManagedServer:
    """One engine process group serving one profile."""

    def __init__(
        self,
        profile: Profile,
        model_path: Path,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout_s: float | None = None,
        owner_pid: int | None = None,
    ) -> None:
        """``owner_pid``: the process whose death (without `stop`) must take the server down
        (default: the process that calls `start`; the xdist controller for a shared server).
        """
        self.profile = profile
        self.model_path = model_path
        self.log_dir = log_dir
        self.host = host
        self.requested_port = port
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.startup_timeout_s = startup_timeout_s or profile.readiness.timeout_s
        self.port: int | None = None
        self.pid: int | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self.owner_pid = owner_pid
        self._popen: object | None = None
        self._watchdog: object | None = None
        self._log: IO[bytes] | None = None
        self.stop_record: StopRecord | None = None

    # ------------------------------------------------------------------ start
    def command(self, port: int) -> list[str]:
        return self.profile.render_command(
            model=str(self.model_path), port=port, host=self.host, python=self.python
        )

    def start(self) -> Endpoint:
        import subprocess

        port = self.requested_port or free_port(self.host)
        if port_in_use(port, self.host):
            raise ServerError(
                f"profile {self.profile.name!r}: port {port} on {self.host} is already in use; "
                "pick another port or stop whatever listens there"
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"server-{self.profile.name}.log"
        env = {**os.environ, **self.profile.engine.env, **self.extra_env}
        argv = self.command(port)
        self._log = self.log_path.open("ab")
        self._log.write(f"# servelab: starting {argv}\n".encode())
        self._log.flush()
        t0 = time.perf_counter_ns()
        proc = subprocess.Popen(
            with_default_signals(argv, env.get("PATH")),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._popen = proc
        self.pid = proc.pid
        self.port = port
        endpoint = self.endpoint()
        try:
            self._watchdog = start_watchdog(
                proc.pid,
                owner=self.owner_pid or os.getpid(),
                grace_s=self.profile.readiness.stop_timeout_s,
                spec=self.profile.stop,
                log=self._log,
            )
            self._wait_ready(endpoint, t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = (time.perf_counter_ns() - t0) / 1e9
        return endpoint

    def endpoint(self) -> Endpoint:
        if self.port is None:
            raise ServerError(f"profile {self.profile.name!r}: server was never started")
        return Endpoint(
            base_url=f"http://{self.host}:{self.port}",
            model=served_model(self.profile, self.model_path),
            profile=self.profile,
            managed=True,
            log_path=self.log_path,
            model_path=self.model_path,
        )

    def returncode(self) -> int | None:
        import subprocess

        proc = self._popen
        if not isinstance(proc, subprocess.Popen):
            return None
        return proc.poll()

    def ensure_alive(self) -> None:
        """Raise ServerError with the log tail if the engine process has exited."""
        code = self.returncode()
        if code is not None:
            raise ServerError(
                f"profile {self.profile.name!r}: the engine process (pid {self.pid}) exited "
                f"with code {code}. Log {self.log_path}, last lines:\n{log_tail(self.log_path)}"
            )

    def _wait_ready(self, endpoint: Endpoint, t0: int) -> None:
        deadline = t0 + int(self.startup_timeout_s * 1e9)
        poll = self.profile.readiness.poll_interval_s
        stage = "health"
        last_problem = ""
        with httpx.Client(timeout=10.0) as http:
            while True:
                self.ensure_alive()
                if time.perf_counter_ns() > deadline:
                    raise ServerError(
                        f"profile {self.profile.name!r}: not ready after "
                        f"{self.startup_timeout_s:.0f} s (stuck at readiness stage {stage!r}: "
                        f"{last_problem or 'no answer'}). Log {self.log_path}, last lines:\n"
                        f"{log_tail(self.log_path)}"
                    )
                try:
                    stage = "health"
                    r = http.get(endpoint.base_url + self.profile.readiness.health_path)
                    if r.status_code != 200:
                        last_problem = f"HTTP {r.status_code}"
                        time.sleep(poll)
                        continue
                    if traits_of(self.profile).lists_models:
                        stage = "models"
                        r = http.get(endpoint.api_base + "/models")
                        names = [m.get("id") for m in r.json().get("data", [])]
                        if endpoint.model not in names:
                            last_problem = f"/v1/models lists {names}, not {endpoint.model!r}"
                            time.sleep(poll)
                            continue
                    stage = "completion"
                    r = http.post(
                        endpoint.api_base + "/completions",
                        json={"model": endpoint.model, "prompt": "Hello", "max_tokens": 1},
                        timeout=max(10.0, self.startup_timeout_s / 4),
                    )
                    if r.status_code == 200 and r.json().get("choices"):
                        return
                    last_problem = f"1-token completion answered HTTP {r.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    last_problem = f"{type(exc).__name__}: {exc}"
                time.sleep(poll)

    # ------------------------------------------------------------------ stop
    def detach(self) -> None:
        """Leave the server running for another process to stop (xdist controller)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> StopRecord | None:
        """Stop the group by the profile's stop policy (`servelab.stop_policy`), verify that
        nothing survives a forced kill, and return how it stopped (None: never started)."""
        import subprocess

        proc = self._popen
        try:
            if self.pid is None or not isinstance(proc, subprocess.Popen):
                return None
            self.stop_record = terminate_group(
                self.pid,
                port=self.port,
                host=self.host,
                timeout_s=self.profile.readiness.stop_timeout_s,
                reap=proc.wait,
                what=f"profile {self.profile.name!r}",
                spec=self.profile.stop,
                profile=self.profile.name,
                base_url=None if self.port is None else f"http://{self.host}:{self.port}",
            )
            if self.stop_record.draining:
                DRAINING.append(proc)  # left running by policy: never reaped, never warned on
            return self.stop_record
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            self._popen = None
            self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        import subprocess

        watchdog, self._watchdog = self._watchdog, None
        if isinstance(watchdog, subprocess.Popen):
            watchdog.terminate()
            try:
                watchdog.wait(5)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()


def terminate_group(
    pgid: int,
    *,
    port: int | None,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
    reap: Callable[[float], object] | None = None,
    what: str = "server",
    spec: StopSpec | None = None,
    profile: str = "",
    base_url: str | None = None,
) -> StopRecord:
    """Stop the process group by ``spec`` (default: SIGTERM, SIGKILL what is left after
    ``timeout_s``), verify that no member and no listener stays, and return how it stopped.
    `reap` (the owner's Popen.wait) collects the leader so it does not linger as a zombie;
    another process may stop a group it did not start (pytest-xdist workers share a server).
    Members left draining (a policy without forced kill) are named in the record, not killed."""
    spec = spec or StopSpec()
    path = spec.endpoint_path or "/shutdown"
    record = stop_group(
        pgid,
        spec,
        profile=profile or what,
        default_grace_s=timeout_s,
        members=group_members,
        reap=reap,
        shutdown_url=None if base_url is None else base_url.rstrip("/") + path,
        post=_post,
    )
    if record.draining:
        return record
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = group_members(pgid)
    if survivors:
        raise ServerError(f"{what}: processes {survivors} of group {pgid} survived SIGKILL")
    if port is not None and not _wait_port_free(port, host, 10.0):
        raise ServerError(f"{what}: port {port} still in use after teardown")
    return record


def _post(url: str) -> None:
    httpx.post(url, timeout=5.0).raise_for_status()


#: Run as `python -c EXEC_SOURCE PROGRAM ARGS...`: the stop signals back at their default
#: action, then exec the program (the same pid). A process inherits ignored signals across
#: exec: servelab run under nohup or as a background job of a non-interactive shell ignores
#: SIGINT and SIGQUIT (and nohup SIGHUP), so an engine started from it would ignore a
#: `[stop] signal = "SIGINT"` and be killed at the end of its grace (seen in a test's
#: process group, 2026-12-07: SigIgn 0x7 in the job, a forced stop after 5 s).
EXEC_SOURCE = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):\n"
    "    signal.signal(s, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def with_default_signals(argv: list[str], path: str | None = None) -> list[str]:
    """`argv` started through `EXEC_SOURCE`. A program that is not on `path` (the child's
    PATH; None: this process's) raises here, as Popen would have (FileNotFoundError naming
    it), not in the child."""
    import shutil

    if shutil.which(argv[0], path=path) is None:
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    return [sys.executable, "-c", EXEC_SOURCE, *argv]


#: The watchdog's program (``python -c``; arguments: owner pid, process group, grace seconds,
#: the stop signal, 1 or 0: forced kill allowed). It waits on a pidfd of the owner (polls where
#: there is none) and exits as soon as the group is gone; if the owner goes first, it sends the
#: stop policy's signal to the group, then SIGKILLs what is left where the policy allows it.
WATCHDOG_SOURCE = r"""
import os, select, signal, sys, time
owner, pgid, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sig, kill = (sys.argv + ["SIGTERM", "1"])[4:6]
def alive(pid, kill=os.kill, sig=0):
    try:
        kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
try:
    fd = os.pidfd_open(owner)
except ProcessLookupError:
    fd = None
except OSError:
    fd = -1
while fd is not None and alive(pgid, os.killpg):
    if fd >= 0 and select.select([fd], [], [], 0.5)[0]:
        break
    if fd < 0 and (time.sleep(0.5) or not alive(owner)):
        break
if alive(pgid, os.killpg):
    print(f"# servelab watchdog: pid {owner}, which owned this server, is gone without "
          f"stopping it: terminating process group {pgid}", flush=True)
    alive(pgid, os.killpg, getattr(signal, sig, signal.SIGTERM))
    deadline = time.monotonic() + grace
    while alive(pgid, os.killpg) and time.monotonic() < deadline:
        time.sleep(0.1)
    if kill == "1":
        alive(pgid, os.killpg, signal.SIGKILL)
"""


def start_watchdog(
    pgid: int, *, owner: int, grace_s: float, log: IO[bytes] | None, spec: StopSpec | None = None
) -> object:
    """Start the watchdog of process group ``pgid`` in its own session (a teardown of the
    group or a Ctrl-C to pytest does not touch it), stopping by ``spec``; returns its Popen."""
    import subprocess

    spec = spec or StopSpec()
    sig = "SIGTERM" if spec.signal == "endpoint" else spec.signal
    grace = grace_s if spec.grace_s is None else spec.grace_s
    argv = [str(owner), str(pgid), str(grace), sig, "1" if spec.forced_kill else "0"]
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG_SOURCE, *argv],
        stdin=subprocess.DEVNULL,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_port_free(port: int, host: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_in_use(port, host):
            return True
        time.sleep(0.2)
    return not port_in_use(port, host)
