"""One server per profile per session, also under pytest-xdist.

The server here is tests/fakes/openai_stub.py, a stand-in: the point is the pool's sharing
and teardown across worker processes, not the engine (the real engine's lifecycle is in
tests/test_server.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from servelab.pool import ServerPool, TerminationSignals
from servelab.xdist import read_parts, run_once, write_part

STUB = Path(__file__).resolve().parent / "fakes" / "openai_stub.py"

PROFILE = """
schema_version = 1
name = "stub"
description = "stand-in OpenAI server for pool tests"
[engine]
name = "stub"
distribution = "pytest"
module = "pytest"
install_hint = "nothing to install"
command = ["{{python}}", "{stub}"]
args = ["--port", "{{port}}", "--model", "{{served_name}}", "--starts", "{starts}"]
[model]
served_name = "stub-model"
source = "path"
path = "/nonexistent"
context_len = 128
quantization = "none"
[hardware]
accelerator = "cpu"
[readiness]
timeout_s = 30
poll_interval_s = 0.1
"""

TESTS = """
import pytest

@pytest.mark.parametrize("i", range(6))
def test_uses_server(servelab_endpoint, i):
    with open({urls!r}, "a") as f:
        f.write(servelab_endpoint.base_url + "\\n")
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("workers", [None, "2"])
def test_one_server_per_session(pytester: pytest.Pytester, workers: str | None) -> None:
    starts = pytester.path / "starts.txt"
    d = pytester.mkdir("profiles")
    (d / "stub.toml").write_text(PROFILE.format(stub=STUB, starts=starts))
    pytester.makepyfile(TESTS.replace("{urls!r}", repr(str(pytester.path / "urls.txt"))))
    args = ["-p", "no:cacheprovider", "--profiles-dir", str(d), "--profile", "stub"]
    if workers:
        args += ["-n", workers]
    result = pytester.runpytest_subprocess(
        *args, "-W", "error", "--basetemp", str(pytester.path / "bt")
    )
    result.assert_outcomes(passed=6)
    pids = [int(x) for x in starts.read_text().split()]
    assert len(pids) == 1, f"started {len(pids)} servers: {pids}"
    urls = set((pytester.path / "urls.txt").read_text().split())
    assert len(urls) == 1
    assert not alive(pids[0]), "the shared server outlived the session"


def test_run_once_computes_once_and_everyone_gets_the_result(tmp_path: Path) -> None:
    computed: list[int] = []
    results: list[dict[str, Any]] = []

    def compute() -> dict[str, Any]:
        computed.append(1)
        time.sleep(0.2)  # the others arrive while this one holds the lock
        return {"answer": 42}

    def ask() -> None:
        results.append(run_once(tmp_path, "gate cpu/one", compute))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1
    assert results == [{"answer": 42}] * 4
    assert run_once(tmp_path, "gate cpu/two", lambda: {"answer": 7}) == {"answer": 7}


def test_run_once_saves_nothing_when_compute_raises(tmp_path: Path) -> None:
    def boom() -> dict[str, Any]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_once(tmp_path, "k", boom)
    assert run_once(tmp_path, "k", lambda: {"second": True}) == {"second": True}


def test_parts_replace_per_worker_and_read_in_worker_order(tmp_path: Path) -> None:
    for worker in ("gw10-1", "gw2-1", "gw0-1"):
        write_part(tmp_path, worker, {"worker": worker, "n": 1})
    write_part(tmp_path, "gw2-1", {"worker": "gw2-1", "n": 2})  # a later snapshot replaces
    (tmp_path / "part-gw3-torn.json").write_text("{")
    parts = read_parts(tmp_path)
    assert [None if d is None else (d["worker"], d["n"]) for _, d in parts] == [
        ("gw0-1", 1),
        ("gw2-1", 2),
        None,
        ("gw10-1", 1),
    ]


def test_termination_signals_interrupt_once_and_restore() -> None:
    """SIGTERM/SIGHUP become KeyboardInterrupt (pytest's Ctrl-C path); a repeated signal does
    not cut the teardown the first one started; the previous handlers come back."""
    before = {sig: signal.getsignal(sig) for sig in TerminationSignals.SIGNALS}
    signals = TerminationSignals()
    signals.install()
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGHUP received: stopping the servers"):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # the second one is ignored
        time.sleep(0.05)
    finally:
        signals.restore()
    assert {sig: signal.getsignal(sig) for sig in TerminationSignals.SIGNALS} == before


def test_a_termination_signal_inside_an_event_loop_stops_it_between_callbacks() -> None:
    """In a workload's running loop the interrupt comes out of the loop at its next turn (a
    loop asleep in select is woken), never in the middle of a coroutine's step: the task
    in flight is cancelled and finishes its cleanup, and nothing is left unawaited."""
    import asyncio

    cleaned: list[str] = []

    async def workload() -> None:
        try:
            async with asyncio.timeout(60):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(30)  # the loop sleeps in select until the signal wakes it
        except asyncio.CancelledError:  # not the KeyboardInterrupt, raised mid-step before
            cleaned.append("cancelled")
            raise
        finally:
            cleaned.append("done")

    signals = TerminationSignals()
    signals.install()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received"):
            asyncio.run(workload())
    finally:
        signals.restore()
    assert time.monotonic() - t0 < 5
    assert cleaned == ["cancelled", "done"] and signals.received == "SIGTERM"


def test_pool_close_restores_the_signal_handlers(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    pool = ServerPool(tmp_path)
    pool.signals.install()
    assert signal.getsignal(signal.SIGTERM) is not before
    pool.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_card_count_variant_stops_its_siblings_first(tmp_path: Path) -> None:
    """`NAME@2cards` needs the cards `NAME@1card` holds: the pool stops the sibling (by its
    stop policy, recorded) before starting the next variant; an unrelated profile stays."""
    import dataclasses

    from servelab.profiles import CardsSpec, load_profile

    path = tmp_path / "stub.toml"
    path.write_text(PROFILE.format(stub=STUB, starts=tmp_path / "starts.txt"))
    stub = load_profile(path)

    def variant(n: int) -> Any:
        return dataclasses.replace(
            stub, name=f"stub@{n}cards", cards=CardsSpec(counts=(1, 2), base="stub")
        )

    pool = ServerPool(tmp_path / "logs")
    try:
        other = pool.get(stub)
        one = pool.get(variant(1))
        assert alive(one.pid)
        two = pool.get(variant(2))
        assert alive(two.pid) and not alive(one.pid)
        assert "stub@1cards" in pool.stops and pool.engine_pids(variant(1)) == []
        assert alive(other.pid)  # not a sibling
    finally:
        pool.close()
    assert not alive(two.pid) and not alive(other.pid)


def test_an_engine_that_never_gets_ready_is_stopped_and_its_stop_recorded(tmp_path: Path) -> None:
    """Issue 25: a start that fails (here: never ready within the readiness timeout) stops the
    engine by its policy; that stop is an engine's stop like any other and joins `stops`
    (before, only stops at session end were recorded)."""
    from servelab.errors import ServerError
    from servelab.profiles import load_profile

    path = tmp_path / "silent.toml"
    lines = PROFILE.format(stub=STUB, starts=tmp_path / "starts.txt").splitlines()
    swap = {
        "name": 'name = "silent"',
        "command": 'command = ["sleep", "60"]',  # never listens: never ready
        "args": "args = []",
        "timeout_s": "timeout_s = 1",
    }
    path.write_text("\n".join(swap.get(line.split(" =")[0], line) for line in lines) + "\n")
    profile = load_profile(path)
    assert profile.engine.command == ("sleep", "60"), profile.engine.command
    pool = ServerPool(tmp_path / "logs")
    try:
        with pytest.raises(ServerError, match="not ready"):
            pool.get(profile)
    finally:
        pool.close()
    stop = pool.stops["silent"]
    assert stop.signal == "SIGTERM" and stop.clean_stop and not stop.forced
    assert not alive(stop.pid)
