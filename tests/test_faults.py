"""Fault runs: each fault ends within 60 s of happening, with a clear message, a record where
pytest survives to write one, and no process left behind.

Stand-ins, and why they are honest here: the faults (a server that never sends a first
token, HTTP 500, a malformed chunk, a reset connection, SIGTERM or ``kill -9`` at a chosen
moment) cannot be produced on demand by the real engine, and on two cores each real start
costs half a minute. The engine is `tests/fakes/engine_stub.py`, a separate process group
started through the real `ServerPool`/`ManagedServer` from a profile, exactly as vLLM is;
it speaks vLLM's wire format. pytest runs in a subprocess (``pytester``'s folder) so that
it can be signalled and killed. The real engine's own lifecycle is in tests/test_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servelab.quality import load_quality_file, run_gate
from servelab.server import WATCHDOG_SOURCE, Endpoint
from tests.fakes.sse import DONE, ThreadedAsyncServer, chunk, usage

STUB = Path(__file__).resolve().parent / "fakes" / "engine_stub.py"
ROOT = Path(__file__).resolve().parents[1]

PROFILE = """
schema_version = 1
name = "{name}"
description = "stand-in engine ({mode}) for fault tests"
[engine]
name = "stub"
distribution = "pytest"
module = "pytest"
install_hint = "nothing to install"
command = ["{{python}}", "{stub}"]
args = ["--port", "{{port}}", "--model", "{{served_name}}", "--mode", "{mode}",
        "--pids", "{pids}", "--child"]
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
[limits]
request_timeout_s = 20
"""

#: Measures one request, then sends one that the stand-in never answers: the fault (a
#: signal, a kill) arrives while it waits, as it would mid-measurement.
WAITING = """
from pathlib import Path
from servelab.client import completion_payload
from servelab.loadgen import run_requests
from servelab.session import request_row

def test_measuring(servelab_endpoint, servelab_state):
    model = servelab_endpoint.model
    ok = run_requests(servelab_endpoint, [completion_payload(model, "hi", 4)], progress=False)
    servelab_state.requests.extend(request_row(r, test="measuring", run=0) for r in ok.records)
    assert ok.records[0].success, ok.records[0].error
    Path({marker!r}).write_text("waiting")
    res = run_requests(
        servelab_endpoint, [completion_payload(model, "HANG", 4)], timeout_s=120, progress=False
    )
    servelab_state.requests.extend(request_row(r, test="measuring", run=1) for r in res.records)
    assert res.records[0].success, res.records[0].error
"""

#: A decode workload as a perf test runs it, bounded by the profile's limits plus a short
#: first-token timeout (what ``limits.first_token_timeout_s`` / ``--request-timeout`` give).
DECODE = """
from servelab import workloads

def test_decode(servelab_endpoint, servelab_profile):
    # A ClientError from the workload (a stuck server, an error answer) fails the test with
    # its reason and joins the record's invalid reasons: the plugin does both.
    settings = workloads.Settings.for_limits(
        servelab_profile.limits, first_token_timeout_s=3, progress=False
    )
    workloads.decode(
        servelab_endpoint, prompt_tokens=8, output_tokens=4, runs=3, settings=settings
    )
"""


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return []
    return [] if state == "Z" else raw.decode(errors="replace").split("\0")


def leftovers(tag: str, owner: int) -> list[str]:
    """Live processes started for this test: the stand-in engines and their children (their
    arguments name a path under ``tag``) and the watchdogs of ``owner`` (the inner pytest)."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = cmdline(int(entry.name))
        if len(argv) >= 6 and argv[2] == WATCHDOG_SOURCE and argv[3] == str(owner):
            found.append(f"{entry.name}: servelab watchdog of group {argv[4]}")
        elif any(tag in a for a in argv) and "pytest" not in argv:
            found.append(f"{entry.name}: {' '.join(argv)[:160]}")
    return found


def pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if cmdline(p)]


def wait_for(predicate: object, timeout: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


class Session:
    """An inner pytest session in a subprocess, against stand-in profiles."""

    def __init__(self, path: Path, modes: dict[str, str], test: str) -> None:
        self.path = path
        self.profiles = path / "profiles"
        self.profiles.mkdir(exist_ok=True)
        self.marker = path / "marker.txt"
        for name, mode in modes.items():
            text = PROFILE.format(name=name, mode=mode, stub=STUB, pids=self.pids_file(name))
            (self.profiles / f"{name}.toml").write_text(text)
        (path / "test_inner.py").write_text(test.replace("{marker!r}", repr(str(self.marker))))
        args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error"]
        args += ["--profiles-dir", str(self.profiles), "test_inner.py", "-rA", "--durations=0"]
        for name in modes:
            args += ["--profile", name]
        search = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(search), "COLUMNS": "400"}
        self.proc = subprocess.Popen(
            args,
            cwd=path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the signals below reach pytest only
        )
        self.started = time.monotonic()

    def leftovers(self) -> list[str]:
        return leftovers(str(self.path), self.proc.pid)

    def pids_file(self, name: str) -> Path:
        return self.path / f"pids-{name}.txt"

    def engine_pids(self, name: str) -> list[int]:
        f = self.pids_file(name)
        return [int(x) for x in f.read_text().split()] if f.exists() else []

    def wait_marker(self) -> None:
        if not wait_for(self.marker.exists, 30):
            self.proc.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"the inner test never reached its waiting point:\n{out}")

    def finish(self, timeout: float = 60.0) -> tuple[int, str, float]:
        """Exit code, output, and seconds from now until pytest exited."""
        t0 = time.monotonic()
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"pytest did not end within {timeout:g} s of the fault:\n{out}")
        return self.proc.returncode, out, time.monotonic() - t0

    def record(self) -> dict[str, object]:
        records = sorted((self.path / "results" / "records").glob("*/record.json"))
        assert records, f"no record under {self.path / 'results'}"
        data = json.loads(records[-1].read_text())
        assert isinstance(data, dict)
        return data


@pytest.fixture
def session_dir(pytester: pytest.Pytester) -> Iterator[Path]:
    yield pytester.path
    # A failed test must not leak what it checks for: kill the stand-ins' groups by pid.
    for f in pytester.path.glob("pids-*.txt"):
        for pid in pids_alive([int(x) for x in f.read_text().split()]):
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)


def interrupted(record: dict[str, object]) -> object:
    session = record.get("session")
    return session.get("interrupted") if isinstance(session, dict) else record.get("interrupted")


# ------------------------------------------------------------------- SIGTERM, SIGHUP


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_signal_tears_down_like_ctrl_c(session_dir: Path, sig: signal.Signals) -> None:
    """A CI timeout or cancel (SIGTERM), a closed terminal (SIGHUP): pytest ends as after
    Ctrl-C: fixtures torn down, engine group gone, partial record with "interrupted": true."""
    s = Session(session_dir, {"stub": "ok"}, WAITING)
    s.wait_marker()
    engine = s.engine_pids("stub")
    assert pids_alive(engine) == engine  # API server and engine core both up
    s.proc.send_signal(sig)
    code, out, took = s.finish()
    print(f"{sig.name} to pytest: exited {took:.1f} s later")
    assert code == pytest.ExitCode.INTERRUPTED, out
    assert f"{sig.name} received" in out, out
    assert took < 60, f"{took:.1f} s"
    assert wait_for(lambda: not pids_alive(engine), 5), f"orphaned engine {pids_alive(engine)}"
    assert s.leftovers() == []
    assert interrupted(s.record()) is True


# ------------------------------------------------------------------- kill -9 of pytest


def test_kill_9_of_pytest_takes_the_engine_group_down(session_dir: Path) -> None:
    """pytest killed outright can tear nothing down: the server's watchdog does, at once,
    and says so in the server log. (No record: nothing of pytest is left to write one.)"""
    s = Session(session_dir, {"stub": "ok"}, WAITING)
    s.wait_marker()
    engine = s.engine_pids("stub")
    assert pids_alive(engine) == engine
    s.proc.kill()
    s.finish()
    t0 = time.monotonic()
    assert wait_for(lambda: not pids_alive(engine), 30), f"orphaned engine {pids_alive(engine)}"
    print(f"kill -9 of pytest: engine group gone {time.monotonic() - t0:.2f} s later")
    assert time.monotonic() - t0 < 30
    assert wait_for(lambda: s.leftovers() == [], 5), s.leftovers()
    log = (session_dir / "results" / "logs" / "server-stub.log").read_text()
    assert "servelab watchdog" in log and "is gone without stopping it" in log


# ------------------------------------------------------------------- kill -9 of the engine


def test_kill_9_of_the_engine_fails_the_test_with_its_log(session_dir: Path) -> None:
    """The engine's API server dies mid-request: the request fails at once, the test fails
    with the exit code and the log tail, and teardown removes the orphaned engine core."""
    s = Session(session_dir, {"stub": "ok"}, WAITING)
    s.wait_marker()
    engine = s.engine_pids("stub")
    os.kill(engine[0], signal.SIGKILL)
    code, out, took = s.finish()
    print(f"kill -9 of the engine: pytest exited {took:.1f} s later")
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert took < 60
    assert "exited with code -9" in out and "last lines" in out, out
    assert "stand-in engine (ok) listening" in out  # the log tail itself
    assert "request failed" in out or "before the first token" in out or "mid-stream" in out
    assert wait_for(lambda: not pids_alive(engine), 5), f"left {pids_alive(engine)}"
    assert s.leftovers() == []
    assert interrupted(s.record()) is False


# ------------------------------------------------------------------- server faults


def test_server_faults_end_fast_with_clear_messages(session_dir: Path) -> None:
    """One session, four stand-in engines: one hangs (never a first token), one answers
    HTTP 500, one sends a malformed chunk, one resets the connection. Each decode test
    fails within seconds with the reason, the record says why, nothing is left running."""
    modes = {"hang": "hang", "err500": "500", "malformed": "malformed", "reset": "reset"}
    s = Session(session_dir, modes, DECODE)
    code, out, took = s.finish()
    print(f"four faulty engines, one session: {took:.1f} s from start to exit")
    print(
        "\n".join(x for x in out.splitlines() if x.startswith(("FAILED", "0.", "1.", "2.", "3.")))
    )
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert took < 60, f"{took:.1f} s"
    assert "4 failed" in out, out
    expected = {
        "hang": "the server is stuck",
        "err500": "HTTP 500: ",
        "malformed": "malformed chunk (not JSON)",
        "reset": "ClientPayloadError mid-stream: Response payload is not completed",
    }
    for name, text in expected.items():
        node = f"FAILED test_inner.py::test_decode[{name}]"
        line = next((x for x in out.splitlines() if x.startswith(node)), "")
        assert text in line, f"{name}: {line!r}\n{out}"
    assert "no first token within 3 s" in out
    invalid = json.dumps(s.record())
    assert all(text.replace('"', "") in invalid for text in expected.values())
    for name in modes:
        assert not pids_alive(s.engine_pids(name)), name
    assert s.leftovers() == []


# ------------------------------------------------------------------- the quality gate

CANARIES = "schema_version = 1\n" + "".join(
    f'[[canary]]\nid = "c{i}"\napi = "completion"\nprompt = "ping {i}"\n'
    f'max_tokens = 2\nexpect = "pong"\n'
    for i in range(6)
)


class GateServer(ThreadedAsyncServer):
    """Completions only. ``hang``: 200 and headers, then never a first token; ``slow``: the
    right answer after ``delay`` seconds. Counts the requests it received."""

    def __init__(self, mode: str, delay: float = 0.0) -> None:
        super().__init__()
        self.mode, self.delay, self.requests = mode, delay, 0

    def __exit__(self, *exc: object) -> None:
        async def cancel() -> None:  # the answers still waiting, before the loop stops
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(5)
        time.sleep(0.05)
        super().__exit__(*exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            self.requests += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            await writer.drain()
            if self.mode == "hang":
                await reader.read()  # until the client gives up and closes the connection
                return
            await asyncio.sleep(self.delay)
            writer.write(chunk("pong", finish_reason="stop") + usage(2, 1) + DONE)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _gate(server: GateServer, tmp_path: Path, **kw: float) -> tuple[object, float]:
    qfile = tmp_path / "canaries.toml"
    qfile.write_text(CANARIES)
    t0 = time.monotonic()
    report = run_gate(
        Endpoint(base_url=f"http://127.0.0.1:{server.port}", model="m"),
        "stand-in",
        load_quality_file(qfile),
        repeats=2,
        identity_fraction=1.0,
        recall_lines=12,
        timeout_s=300.0,
        **kw,  # type: ignore[arg-type]
    )
    return report, time.monotonic() - t0


def test_gate_stops_at_the_first_stuck_request(tmp_path: Path) -> None:
    """Six canaries against a server that never sends a first token: before, 300 s per
    request (about an hour); now the first request's first-token timeout ends the gate."""
    with GateServer("hang") as server:
        report, took = _gate(server, tmp_path, first_token_timeout_s=1.0)
    print(f"gate against a hung server: {took:.2f} s")
    assert took < 5, f"{took:.1f} s"
    assert server.requests == 1
    assert not report.passed  # type: ignore[attr-defined]
    canaries, identity, recall = report.checks  # type: ignore[attr-defined]
    assert "the server is stuck" in canaries.summary
    assert "timeout: no first token within 1 s" in canaries.problems[0]
    assert identity.summary == recall.summary == "not run: the gate stopped at canaries"
    assert not identity.passed and not recall.passed
    assert any("the server is stuck" in r for r in report.reasons())  # type: ignore[attr-defined]


def test_gate_deadline_bounds_the_whole_gate(tmp_path: Path) -> None:
    """A server that answers right but slowly: the gate ends at its deadline and says so."""
    with GateServer("slow", delay=0.3) as server:
        report, took = _gate(server, tmp_path, deadline_s=1.0)
    print(f"gate with a 1 s deadline against a slow server: {took:.2f} s")
    assert took < 3, f"{took:.1f} s"
    assert not report.passed  # type: ignore[attr-defined]
    canaries = report.checks[0]  # type: ignore[attr-defined]
    assert "the gate did not finish within its 1 s" in canaries.summary, canaries.summary
    assert "(limits.gate_timeout_s or --gate-timeout)" in canaries.summary
    assert "the run's deadline passed (timeout: no first token" in canaries.summary


# ------------------------------------------------------------------- admission (issue 25)


def test_admission_refuses_a_missing_model_path_and_starts_no_engine(session_dir: Path) -> None:
    """A profile whose engine is given ``{model}`` and whose ``model.path`` does not exist:
    before, the engine started and vLLM took the path for a hub id, failing after ~30 s;
    now the test fails at once with the reason, no engine starts, and the record keeps the
    refused admission receipt."""
    profiles = session_dir / "profiles"
    profiles.mkdir()
    pids = session_dir / "pids-nomodel.txt"
    text = PROFILE.format(name="nomodel", mode="ok", stub=STUB, pids=pids)
    text = text.replace('"--model", "{served_name}"', '"--model", "{model}"')
    (profiles / "nomodel.toml").write_text(text)
    (session_dir / "test_inner.py").write_text(DECODE)
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error", "-rA"]
    args += ["--profiles-dir", str(profiles), "--profile", "nomodel", "test_inner.py"]
    search = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(search), "COLUMNS": "400"}
    t0 = time.monotonic()
    done = subprocess.Popen(
        args, cwd=session_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, _ = done.communicate(timeout=120)
    took = time.monotonic() - t0
    print(f"refused admission: pytest exited {took:.1f} s after it started")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "admission refused, no engine started" in out, out
    assert "model.path '/nonexistent' does not exist (model.source = 'path')" in out, out
    assert not pids.exists(), "the engine was started"
    assert not (session_dir / "results" / "logs" / "server-nomodel.log").exists()
    records = sorted((session_dir / "results" / "records").glob("*/record.json"))
    assert records, out
    admission = json.loads(records[-1].read_text())["lab"]["receipts"]["nomodel"]["admission"]
    assert any("does not exist" in p for p in admission["problems"])
    assert leftovers(str(session_dir), done.pid) == []


def test_the_record_carries_admission_and_post_run_receipts_and_each_engines_stop(
    session_dir: Path,
) -> None:
    """A whole session through the plugin: the record's lab section holds each target's
    admission and post-run receipts, their difference and how its engine stopped."""
    s = Session(
        session_dir,
        {"stub": "ok"},
        DECODE.replace("first_token_timeout_s=3", "first_token_timeout_s=10"),
    )
    code, out, took = s.finish()
    print(f"one stand-in session: {took:.1f} s")
    assert code == pytest.ExitCode.OK, out
    lab = s.record()["lab"]
    assert isinstance(lab, dict)
    receipts, stop = lab["receipts"]["stub"], lab["stops"]["stub"]
    assert {"admission", "post_run", "difference"} <= set(receipts), receipts
    assert receipts["admission"]["problems"] == [] == receipts["post_run"]["problems"]
    assert receipts["admission"]["accelerator"] == "cpu"
    assert str(session_dir / "results") in receipts["admission"]["disk_free_gib"]
    assert stop["clean_stop"] is True and stop["signal"] == "SIGTERM" and stop["forced"] is False
    assert stop["forced_allowed"] is True and stop["seconds"] < 10
    assert not pids_alive(s.engine_pids("stub"))
    assert s.leftovers() == []
