"""Stop policy: the signal, the grace, the idle time after a stop, forced kill allowed or not,
and the record of how each engine stopped (issue 25 item 1).

Real process groups (a few lines of Python each) and, through the real `ServerPool`, the
stand-in engine of tests/fakes/engine_stub.py, as tests/test_faults.py uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servelab.errors import ProfileError
from servelab.pool import ServerPool
from servelab.profiles import load_profile
from servelab.receipts import Receipt, post_run_problems
from servelab.server import DRAINING, group_members, with_default_signals
from servelab.stop_policy import StopRecord, StopSpec, stop_group

STUB = Path(__file__).resolve().parent / "fakes" / "engine_stub.py"
ROOT = Path(__file__).resolve().parents[1]

#: Runs the stand-in engine with SIGTERM ignored (inherited by its engine-core child): an
#: engine that does not stop on the policy's signal.
DEAF = (
    "import runpy, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)

PROFILE = """
schema_version = 1
name = "{name}"
description = "stand-in engine for stop-policy tests"
[engine]
name = "stub"
distribution = "pytest"
module = "pytest"
install_hint = "nothing to install"
command = {command}
args = ["--port", "{{port}}", "--model", "{{served_name}}", "--pids", "{pids}", "--child"]
[model]
served_name = "stub-model"
source = "path"
path = "/nonexistent"
context_len = 4096
quantization = "none"
[hardware]
accelerator = "cpu"
[readiness]
timeout_s = 30
poll_interval_s = 0.1
stop_timeout_s = 10
{stop}
"""


def write_profile(folder: Path, name: str, *, deaf: bool = False, stop: str = "") -> Path:
    command = f'["{{python}}", "-c", "{DEAF}", "{STUB}"]' if deaf else f'["{{python}}", "{STUB}"]'
    path = folder / f"{name}.toml"
    pids = folder / f"pids-{name}.txt"
    path.write_text(PROFILE.format(name=name, command=command, pids=pids, stop=stop))
    return path


STARTED: list[subprocess.Popen[bytes]] = []


def group(argv_source: str) -> subprocess.Popen[bytes]:
    """A process group as the server starts one: through `with_default_signals`, so the
    child's SIGINT acts however pytest was started (a background job ignores it)."""
    argv = with_default_signals([sys.executable, "-c", argv_source])
    proc = subprocess.Popen(argv, start_new_session=True)
    STARTED.append(proc)
    return proc


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Process groups to kill after the test (a draining group is left running by design)."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    for proc in [*DRAINING, *STARTED]:
        assert isinstance(proc, subprocess.Popen)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    DRAINING.clear()
    STARTED.clear()


IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
READY = "import sys, time; sys.stdout.write(''); time.sleep(60)"


def test_default_policy_is_todays_sigterm_then_sigkill(cleanup: list[int]) -> None:
    spec = StopSpec()
    assert (spec.signal, spec.grace_s, spec.idle_after_s, spec.forced_kill) == (
        "SIGTERM",
        None,
        0.0,
        True,
    )
    proc = group(READY)
    cleanup.append(proc.pid)
    time.sleep(0.2)
    rec = stop_group(
        proc.pid, spec, profile="p", default_grace_s=5, members=group_members, reap=proc.wait
    )
    assert rec.clean_stop and not rec.forced and rec.signal == "SIGTERM", rec
    assert rec.seconds < 2 and rec.problems() == []
    assert not group_members(proc.pid)


def test_a_stalled_group_is_killed_when_allowed_and_the_record_says_forced(
    cleanup: list[int],
) -> None:
    proc = group(IGNORES_TERM)
    cleanup.append(proc.pid)
    time.sleep(0.3)
    spec = StopSpec(grace_s=0.5)
    rec = stop_group(
        proc.pid, spec, profile="p", default_grace_s=30, members=group_members, reap=proc.wait
    )
    assert rec.forced and not rec.clean_stop and rec.forced_allowed, rec
    assert 0.5 <= rec.seconds < 5
    assert rec.problems() == []  # the policy allows it
    assert not group_members(proc.pid)


def test_no_forced_kill_leaves_the_group_draining_and_fails_the_post_run_check(
    cleanup: list[int],
) -> None:
    proc = group(IGNORES_TERM)
    cleanup.append(proc.pid)
    time.sleep(0.3)
    spec = StopSpec(grace_s=0.5, forced_kill=False)
    rec = stop_group(
        proc.pid, spec, profile="lab", default_grace_s=30, members=group_members, reap=proc.wait
    )
    assert not rec.forced and not rec.clean_stop and rec.draining == (proc.pid,), rec
    assert group_members(proc.pid) == [proc.pid]  # not killed
    (problem,) = rec.problems()
    assert "left draining" in problem and str(proc.pid) in problem


def test_a_forced_stop_the_profile_forbids_fails_the_post_run_check() -> None:
    forced = StopRecord("lab", 4242, "SIGTERM", False, 61.0, True, forced_allowed=False)
    allowed = dataclasses.replace(forced, forced_allowed=True)
    post = Receipt("post_run", "lab", time.time(), "xpu")
    (problem,) = post_run_problems(None, post, [forced])
    assert "killed with SIGKILL, which its stop policy forbids" in problem
    assert "[stop] forced_kill = false" in problem
    assert post_run_problems(None, post, [allowed]) == []
    assert StopRecord.from_dict(forced.to_dict()) == forced


def test_sigint_policy_and_idle_time_after_the_stop(cleanup: list[int]) -> None:
    proc = group("import time; time.sleep(60)")  # SIGINT: KeyboardInterrupt, exit
    cleanup.append(proc.pid)
    time.sleep(0.3)
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(min(s, 0.1))

    spec = StopSpec(signal="SIGINT", idle_after_s=10)
    rec = stop_group(
        proc.pid,
        spec,
        profile="p",
        default_grace_s=5,
        members=group_members,
        reap=proc.wait,
        sleep=sleep,
    )
    assert rec.clean_stop and rec.signal == "SIGINT" and rec.idle_after_s == 10, rec
    assert slept[-1] == 10  # the idle time comes after the group is gone


def test_a_failing_shutdown_endpoint_falls_back_to_sigterm_and_is_not_clean(
    cleanup: list[int],
) -> None:
    proc = group(READY)
    cleanup.append(proc.pid)
    time.sleep(0.2)

    def post(url: str) -> None:
        raise OSError(f"connection refused: {url}")

    spec = StopSpec(signal="endpoint", endpoint_path="/shutdown")
    rec = stop_group(
        proc.pid,
        spec,
        profile="p",
        default_grace_s=5,
        members=group_members,
        reap=proc.wait,
        shutdown_url="http://127.0.0.1:9/shutdown",
        post=post,
    )
    assert rec.signal == "SIGTERM" and not rec.clean_stop and not rec.forced
    assert "shutdown endpoint failed" in rec.note and "connection refused" in rec.note


def test_profiles_read_the_stop_table_and_old_profiles_keep_todays_policy(tmp_path: Path) -> None:
    cpu = load_profile(ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml")
    assert cpu.stop == StopSpec()
    assert cpu.limits.min_free_disk_gib is None and cpu.limits.min_free_memory_gib is None
    for name in ("gemma4-12b-c8", "minimax-m27-c1", "minimax-m27-c8"):
        lab = load_profile(ROOT / "fixtures" / "profiles" / f"{name}.toml")
        assert lab.stop == StopSpec("SIGTERM", None, 60.0, 10.0, False), name
        assert lab.limits.min_free_disk_gib == 50
    bad = write_profile(tmp_path, "bad", stop='[stop]\nsignal = "endpoint"\n')
    with pytest.raises(ProfileError, match=r"stop\.endpoint_path"):
        load_profile(bad)
    bad.write_text(bad.read_text().replace('signal = "endpoint"', 'signal = "SIGKILL"'))
    with pytest.raises(ProfileError, match="stop"):
        load_profile(bad)


def test_the_pool_records_each_engines_stop(tmp_path: Path, cleanup: list[int]) -> None:
    """Through the real pool: a cooperative stand-in stops clean; one deaf to SIGTERM is
    killed where the policy allows it and left draining (and named) where it does not."""
    profiles = [
        load_profile(write_profile(tmp_path, "polite", stop="[stop]\nidle_after_s = 0.2\n")),
        load_profile(write_profile(tmp_path, "deaf", deaf=True, stop="[stop]\ngrace_s = 1\n")),
        load_profile(
            write_profile(
                tmp_path, "lab", deaf=True, stop="[stop]\ngrace_s = 1\nforced_kill = false\n"
            )
        ),
    ]
    pool = ServerPool(tmp_path / "logs")
    try:
        pids = {p.name: pool.get(p).pid for p in profiles}
        cleanup.extend(pids.values())
    finally:
        pool.close()
    polite, deaf, lab = (pool.stops[p.name] for p in profiles)
    print({k: v.to_dict() for k, v in pool.stops.items()})
    assert polite.clean_stop and not polite.forced and polite.idle_after_s == 0.2
    assert deaf.forced and not deaf.clean_stop and deaf.problems() == []
    assert not group_members(pids["deaf"]) and not group_members(pids["polite"])
    assert lab.draining and not lab.forced and lab.problems()
    assert sorted(group_members(pids["lab"])) == sorted(lab.draining)


@pytest.mark.parametrize("forced_kill", [True, False])
def test_the_owner_death_watchdog_follows_the_policy(cleanup: list[int], forced_kill: bool) -> None:
    """pytest killed outright: the server's watchdog sends the policy's signal and kills what
    is left only where the policy allows it (the lab's groups are left draining)."""
    from servelab.server import start_watchdog

    owner = group("import time; time.sleep(60)")
    engine = group(IGNORES_TERM)
    cleanup += [owner.pid, engine.pid]
    time.sleep(0.3)
    spec = StopSpec(grace_s=0.5, forced_kill=forced_kill)
    dog = start_watchdog(engine.pid, owner=owner.pid, grace_s=30, log=None, spec=spec)
    assert isinstance(dog, subprocess.Popen)
    os.killpg(owner.pid, signal.SIGKILL)
    owner.wait()
    dog.wait(10)
    time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        engine.wait(0.5)
    assert bool(group_members(engine.pid)) is not forced_kill


def _ignored(pid: int) -> int:
    """The signals process `pid` ignores (its SigIgn mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn line for pid {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_an_engine_started_from_a_job_that_ignores_sigint_does_not(cleanup: list[int]) -> None:
    """servelab under nohup or as a background job ignores SIGINT and SIGQUIT, and a
    process inherits that across exec: started through `with_default_signals`, the engine
    has them at their default action again (same pid: the program replaces the launcher),
    so a SIGINT stop policy stops it cleanly; started directly, it keeps ignoring them."""
    ignore = signal.SIGINT, signal.SIGQUIT, signal.SIGHUP
    mask = sum(1 << (s - 1) for s in ignore)

    def as_a_background_job() -> None:
        for s in ignore:
            signal.signal(s, signal.SIG_IGN)

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {}
    for name, argv in (("direct", sleeper), ("wrapped", with_default_signals(sleeper))):
        procs[name] = subprocess.Popen(argv, start_new_session=True, preexec_fn=as_a_background_job)
        cleanup.append(procs[name].pid)
        STARTED.append(procs[name])  # waited on by the fixture
    cmdline = Path(f"/proc/{procs['wrapped'].pid}/cmdline")
    deadline = time.monotonic() + 20
    while cmdline.read_bytes().split(b"\0")[1:3] != [b"-c", b"import time; time.sleep(60)"]:
        assert time.monotonic() < deadline, "the launcher never exec'd the program"
        time.sleep(0.05)  # same pid: the program replaced the launcher
    assert _ignored(procs["direct"].pid) & mask == mask
    assert _ignored(procs["wrapped"].pid) & mask == 0
    rec = stop_group(
        procs["wrapped"].pid,
        StopSpec(signal="SIGINT"),
        profile="p",
        default_grace_s=5,
        members=group_members,
        reap=procs["wrapped"].wait,
    )
    assert rec.clean_stop and not rec.forced, rec


def test_a_program_that_is_not_there_is_named_before_any_child_starts() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-engine-binary"):
        with_default_signals(["no-such-engine-binary", "--port", "1"])
