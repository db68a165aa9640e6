"""How an engine is stopped, and the record of how it stopped.

A profile's `[stop]` table says which signal ends the engine (``SIGTERM``, ``SIGINT``, or a
POST to the engine's own shutdown endpoint), how long it has to exit (the grace), how long
to stay idle after it is gone before anything starts again, and whether a forced kill
(``SIGKILL``) is allowed at all. The default is servelab's CPU behaviour: SIGTERM to the
process group, SIGKILL to what is left after the readiness stop timeout, no idle time.

The B70 lab's rule (October 2026): one cooperative teardown path; a process that calls
``os._exit`` right after releasing its device buffers faulted the cards about 70 ms later,
so no supervisor kill counts as a success, a stalled child is left *draining* instead of
killed, and the next start waits a fixed idle time. With ``forced_kill = false`` the members
still alive after the grace are left running and named in the `StopRecord`; the post-run
check (`servelab.receipts.post_run_problems`) fails on them and on any forced stop the
profile does not allow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

StopSignal = Literal["SIGTERM", "SIGINT", "endpoint"]

#: How long the survivors of a SIGKILL may take to disappear (the kernel reaps them).
KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class StopSpec:
    """A profile's `[stop]` table (every field optional; the defaults are today's CPU policy)."""

    signal: StopSignal = "SIGTERM"
    # "endpoint": the path POSTed on the engine's own server (e.g. "/shutdown").
    endpoint_path: str | None = None
    grace_s: float | None = None  # None: readiness.stop_timeout_s
    idle_after_s: float = 0.0
    forced_kill: bool = True


@dataclass(frozen=True)
class StopRecord:
    """How one engine stopped. ``clean_stop``: the whole group exited on the policy's own
    signal within the grace, nothing was forced and nothing is left draining."""

    profile: str
    pid: int
    signal: str
    clean_stop: bool
    seconds: float
    forced: bool
    forced_allowed: bool
    draining: tuple[int, ...] = ()
    idle_after_s: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["draining"] = list(self.draining)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StopRecord:
        return cls(
            profile=str(d["profile"]),
            pid=int(d["pid"]),
            signal=str(d["signal"]),
            clean_stop=bool(d["clean_stop"]),
            seconds=float(d["seconds"]),
            forced=bool(d["forced"]),
            forced_allowed=bool(d["forced_allowed"]),
            draining=tuple(int(p) for p in d.get("draining", ())),
            idle_after_s=float(d.get("idle_after_s", 0.0)),
            note=str(d.get("note", "")),
        )

    def problems(self) -> list[str]:
        """What the post-run check holds against this stop (empty when it passes)."""
        out = []
        if self.forced and not self.forced_allowed:
            out.append(
                f"profile {self.profile!r}: the engine (group {self.pid}) did not exit on "
                f"{self.signal} and was killed with SIGKILL, which its stop policy forbids "
                "([stop] forced_kill = false): check the cards before the next run"
            )
        if self.draining:
            out.append(
                f"profile {self.profile!r}: processes {list(self.draining)} of group {self.pid} "
                f"were still running {self.seconds:.1f} s after {self.signal} and were left "
                "draining (the policy allows no forced kill): wait for them, then check the cards"
            )
        return out


def stop_group(
    pgid: int,
    spec: StopSpec,
    *,
    profile: str,
    default_grace_s: float,
    members: Callable[[int], list[int]],
    reap: Callable[[float], object] | None = None,
    shutdown_url: str | None = None,
    post: Callable[[str], object] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> StopRecord:
    """Stop process group ``pgid`` by ``spec`` and say how it went.

    ``members(pgid)`` lists the live members; ``reap`` (the owner's ``Popen.wait``) collects
    the leader; ``shutdown_url`` and ``post`` serve the ``endpoint`` signal (a failed POST
    falls back to SIGTERM, and the record's note says so). Never raises for a stalled group:
    the record says whether it was forced or is left draining.
    """
    grace = default_grace_s if spec.grace_s is None else spec.grace_s
    note = ""
    t0 = time.monotonic()
    sent = spec.signal
    if spec.signal == "endpoint":
        try:
            if shutdown_url is None or post is None:
                raise OSError("no shutdown URL known for this engine")
            post(shutdown_url)
        except Exception as exc:  # any failure of the engine's endpoint: fall back
            note = f"shutdown endpoint failed ({type(exc).__name__}: {exc}); sent SIGTERM"
            sent = "SIGTERM"
            signal_group(pgid, signal.SIGTERM)
    else:
        signal_group(pgid, signal.Signals[spec.signal])
    deadline = t0 + grace
    if reap is not None:
        with contextlib.suppress(Exception):
            reap(max(0.0, grace))
    while members(pgid) and time.monotonic() < deadline:
        sleep(0.1)
    forced = False
    draining: tuple[int, ...] = ()
    left = members(pgid)
    if left and spec.forced_kill:
        # Seen: the API server ignored a first SIGTERM and kept serving.
        forced = True
        signal_group(pgid, signal.SIGKILL)
        if reap is not None:
            with contextlib.suppress(Exception):
                reap(KILL_WAIT_S)
        kill_deadline = time.monotonic() + KILL_WAIT_S
        while members(pgid) and time.monotonic() < kill_deadline:
            sleep(0.1)
    elif left:
        draining = tuple(left)
    seconds = time.monotonic() - t0
    idle = 0.0
    if not left and spec.idle_after_s > 0:
        sleep(spec.idle_after_s)
        idle = spec.idle_after_s
    return StopRecord(
        profile=profile,
        pid=pgid,
        signal=sent,
        clean_stop=not forced and not draining and sent == spec.signal,
        seconds=round(seconds, 3),
        forced=forced,
        forced_allowed=spec.forced_kill,
        draining=draining,
        idle_after_s=idle,
        note=note,
    )


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stops_problems(stops: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The post-run problems of saved stop records (by profile)."""
    return [p for d in stops.values() for p in StopRecord.from_dict(d).problems()]
