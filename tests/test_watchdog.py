"""Session watchdogs and the stop switch (issue 25 item 3).

The checks on their own, then whole sessions in this process: the stand-in engine of
tests/fakes/engine_stub.py started through the real `ServerPool` (as tests/test_faults.py
does), a request that never ends, and a ``STOP`` file or a memory floor that ends the
session within seconds: the request abandoned, the engine stopped by its policy, the record
written with the reason, receipts and the stop, and no process left.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from servelab.client import completion_payload
from servelab.finish import finish, session_redactor
from servelab.hardware import HostIdentity
from servelab.loadgen import run_requests
from servelab.pool import ServerPool
from servelab.profiles import load_profile
from servelab.receipts import ToolOutput, admit_into, post_run_into
from servelab.session import SessionInfo, SessionResults, request_row
from servelab.watchdog import STOP_FILE, SessionWatchdog
from tests.test_faults import leftovers, pids_alive, wait_for
from tests.test_stop_policy import write_profile

ROOT = Path(__file__).resolve().parents[1]
MEMINFO = (ROOT / "fixtures" / "hardware" / "meminfo.txt").read_text()  # 238.6 GiB available
LOW = MEMINFO.replace("MemAvailable:   250212948 kB", "MemAvailable:     1048576 kB")  # 1 GiB
HOST = HostIdentity("cpu-test-1", "Test CPU", 2, 2, 2**30, "Linux", "6.1", "x86_64")


def test_the_checks(tmp_path: Path) -> None:
    memory = [MEMINFO]
    kernel = ["[    1.0] boot\n"]

    def probe(argv: Sequence[str]) -> ToolOutput:
        return ToolOutput(tuple(argv), "ok", kernel[0])

    dog = SessionWatchdog(
        tmp_path, min_free_memory_gib=16, kernel_log=True, since_s=0.0,
        meminfo=lambda: memory[0], probe=probe,
    )  # fmt: skip
    assert dog.check() is None
    memory[0] = LOW
    assert "memory watchdog: 1.00 GiB of host memory available, under the floor of 16 GiB" in str(
        dog.check()
    )
    memory[0] = MEMINFO
    kernel[0] += "[  12.5] xe 0000:83:00.0: [drm] GT0: Device wedged, needs recovery\n"
    assert "kernel-log fault during the run: [  12.5] xe 0000:83:00.0" in str(dog.check())
    assert dog.check() is None  # a line is reported once
    (tmp_path / STOP_FILE).write_text("")
    assert f"operator stop: {tmp_path / STOP_FILE} exists (remove it to run again)" in str(
        dog.check()
    )


def test_the_watchdog_does_nothing_without_a_trip(tmp_path: Path) -> None:
    with SessionWatchdog(tmp_path, interval_s=0.05) as dog:
        time.sleep(0.3)
    assert dog.reason is None


def session(
    tmp_path: Path, trip: Callable[[], None], meminfo: Callable[[], str], floor: float | None
) -> tuple[dict[str, object], float, list[int]]:
    """One session against the stand-in until the watchdog ends it; (record, seconds from
    the trip to the record written, engine pids)."""
    profile = load_profile(write_profile(tmp_path, "stub"))
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    results = SessionResults()
    pool = ServerPool(results_dir / "logs")
    started_at = time.time()
    kw = {"folders": [results_dir], "since_s": time.monotonic(), "meminfo": meminfo}
    dog = SessionWatchdog(
        results_dir,
        min_free_memory_gib=floor,
        interval_s=0.2,
        on_trip=lambda reason: results.invalidate([reason]),
        meminfo=meminfo,
    )
    tripped: list[float] = []

    def trip_now() -> None:
        tripped.append(time.monotonic())
        trip()

    interrupted = False
    try:
        with dog:
            admit_into(results.receipts, profile, **kw)
            endpoint = pool.get(profile).endpoint
            pids = [int(x) for x in (tmp_path / "pids-stub.txt").read_text().split()]
            ok = run_requests(endpoint, [completion_payload(endpoint.model, "hi", 4)])
            results.requests += [request_row(r, test="t", run=0) for r in ok.records]
            threading.Timer(0.3, trip_now).start()
            with pytest.raises(KeyboardInterrupt, match="servelab watchdog: ") as info:
                run_requests(
                    endpoint, [completion_payload(endpoint.model, "HANG", 4)], timeout_s=60
                )
            interrupted = True
            print(f"interrupted {time.monotonic() - tripped[0]:.2f} s after the trip: {info.value}")
    finally:
        pool.close()
        results.stops.update({n: r.to_dict() for n, r in pool.stops.items()})
        post_run_into(results.receipts, [profile], pool.stops, **kw)
    info_ = SessionInfo(started_at, time.time(), "pytest -m perf", 2, interrupted, "c", "lab",
                        invalid_reasons=tuple(results.invalid_reasons))  # fmt: skip
    out = finish(
        results,
        info_,
        host=HOST,
        results_dir=results_dir,
        baselines_dir=tmp_path / "baselines",
        redactor=session_redactor(None),
    )
    took = time.monotonic() - tripped[0]
    assert out.record is not None
    record = json.loads((out.record / "record.json").read_text())
    return record, took, pids


def check_record(
    record: dict[str, object], reason: str, pids: list[int], took: float, tag: Path
) -> None:
    text = json.dumps(record)
    assert reason in text, text[:2000]
    lab = record["lab"]
    assert isinstance(lab, dict)
    stop = lab["stops"]["stub"]
    assert stop["clean_stop"] is True and stop["forced"] is False and stop["signal"] == "SIGTERM"
    receipts = lab["receipts"]["stub"]
    assert {"admission", "post_run", "difference"} <= set(receipts)
    assert receipts["post_run"]["problems"] == []
    assert took < 10, f"{took:.1f} s from the trip to the record"
    assert wait_for(lambda: not pids_alive(pids), 5), f"orphaned engine {pids_alive(pids)}"
    assert leftovers(str(tag), os.getpid()) == []


def test_a_stop_file_ends_the_session_cleanly_within_seconds(tmp_path: Path) -> None:
    stop = tmp_path / "results" / STOP_FILE
    record, took, pids = session(tmp_path, stop.touch, lambda: MEMINFO, None)
    print(f"STOP file: record written {took:.2f} s after the trip")
    check_record(record, f"operator stop: {stop} exists", pids, took, tmp_path)


def test_the_memory_watchdog_ends_the_session_cleanly_within_seconds(tmp_path: Path) -> None:
    memory = [MEMINFO]
    record, took, pids = session(
        tmp_path, lambda: memory.__setitem__(0, LOW), lambda: memory[0], 16
    )
    print(f"memory floor: record written {took:.2f} s after the trip")
    check_record(record, "memory watchdog: 1.00 GiB of host memory available", pids, took, tmp_path)
