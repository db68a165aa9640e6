"""The plugin under pytest-xdist: one quality gate per target, one record, one summary.

The server is the streaming stub of tests/test_quality.py (its answers chosen by the test,
every completion request counted); the perf wiring is the installed plugin's. The point is
servelab's coordination of the workers, not the engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_quality import GOOD, Stub

ROOT = Path(__file__).resolve().parents[1]
SPEED_TESTS = 6
# One gate against the stub: 2 canaries x (2 sequential + 2 concurrent); no recall workload
# for an external endpoint. Checked against a run without xdist below, not just assumed.
GATE_REQUESTS = 8

TESTS = f"""
import os
import pytest
pytestmark = pytest.mark.perf

from servelab.figures import Figure, Shape

@pytest.mark.parametrize("i", range({SPEED_TESTS}))
def test_speed(servelab_endpoint, servelab_identity, servelab_record, servelab_state, i):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    servelab_state.requests.append({{"test": "test_speed", "i": i, "worker": worker}})
    servelab_record(Figure(
        metric=f"stub_tok_s_{{i}}", title=f"stub rate {{i}}", unit="tok/s", direction="higher",
        runs=(100.0 + i, 101.0 + i, 99.0 + i), shape=Shape(8, 8, 1), warm=True,
        identity=servelab_identity,
    ))

def test_gate_report(servelab_quality_gate):
    assert servelab_quality_gate.passed, servelab_quality_gate.reasons()
"""

CRASH = """
import os

def test_zz_worker_dies(servelab_endpoint):
    os._exit(1)
"""


@pytest.fixture
def qfile(tmp_path: Path) -> Path:
    p = tmp_path / "q.toml"
    p.write_text(GOOD)
    return p


def session(
    pytester: pytest.Pytester, mode: str, qfile: Path, name: str, *args: str
) -> tuple[pytest.RunResult, int, Path]:
    """Run the perf wiring against a fresh stub; (result, completion requests, results dir)."""
    pytester.makepyfile(test_speed=TESTS)
    results = pytester.path / name / "results"
    with Stub(mode) as stub:
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "--endpoint",
            stub.url + "/v1",
            f"--quality-file={qfile}",
            f"--results-dir={results}",
            f"--baselines-dir={pytester.path / name / 'baselines'}",
            *args,
        )
    return result, stub.calls, results


def verdict_table(result: pytest.RunResult) -> list[str]:
    """The table under the "servelab verdicts" header: column names, rule, one row a figure."""
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if "servelab verdicts" in line)
    return lines[start + 1 : start + 3 + SPEED_TESTS]


def only_record(results: Path) -> dict[str, Any]:
    records = sorted((results / "records").glob("*/record.json"))
    assert len(records) == 1, f"expected one record for the session, got {records}"
    data: dict[str, Any] = json.loads(records[0].read_text())
    return data


def test_gate_once_one_record_and_the_summary_under_xdist(
    pytester: pytest.Pytester, qfile: Path
) -> None:
    plain, plain_calls, _ = session(pytester, "right", qfile, "plain")
    plain.assert_outcomes(passed=SPEED_TESTS + 1)
    assert plain_calls == GATE_REQUESTS

    result, calls, results = session(
        pytester, "right", qfile, "xdist", "-n", "2", "--update-baselines"
    )
    result.assert_outcomes(passed=SPEED_TESTS + 1)
    record = only_record(results)
    rows = [json.loads(x) for x in (record_dir(results) / "raw.jsonl").read_text().splitlines()]
    workers = {r["worker"] for r in rows}
    assert workers == {"gw0", "gw1"}, f"both workers must have measured: {workers}"
    # The gate ran once in the session, not once per worker.
    assert calls == GATE_REQUESTS

    # Nothing measured on either worker is missing from the one record.
    (res,) = record["results"]
    assert sorted(f["metric"] for f in res["figures"]) == sorted(
        f"stub_tok_s_{i}" for i in range(SPEED_TESTS)
    )
    assert sorted(r["i"] for r in rows) == list(range(SPEED_TESTS))
    lab = record["lab"]
    assert len(lab["metrics"]) == SPEED_TESTS + 1  # a /metrics delta per test, both workers
    assert lab["gates"]["endpoint"]["passed"] is True
    checks = record["session"]["quality_checks"]
    assert len(checks) == len(set(checks)) == 3  # canaries, identity, recall: once each
    assert record["session"]["invalid_reasons"] == []

    # The controller prints the same verdict table as a run without xdist (rows in the
    # order the workers' results were merged), and the quality gate summary.
    table = verdict_table(result)
    assert sorted(table) == sorted(verdict_table(plain))
    assert sum("stub_tok_s_" in line for line in table) == SPEED_TESTS
    result.stdout.fnmatch_lines(["*quality gate PASS*", "*servelab figures*", "*record written:*"])

    # One baseline update with every worker's figures.
    (baseline,) = (pytester.path / "xdist" / "baselines").rglob("*.json")
    text = baseline.read_text()
    assert all(f"stub_tok_s_{i}" in text for i in range(SPEED_TESTS))


def record_dir(results: Path) -> Path:
    (folder,) = (results / "records").glob("*/")
    return folder


def test_failed_gate_errors_every_speed_test_on_every_worker(
    pytester: pytest.Pytester, qfile: Path
) -> None:
    result, calls, results = session(
        pytester, "wrong", qfile, "xdist", "-n", "2", "-v", "--update-baselines"
    )
    assert calls == GATE_REQUESTS  # the second worker reused the failed outcome
    # Exactly as without xdist: each speed test errors in setup, the gate's own test fails.
    result.assert_outcomes(failed=1, errors=SPEED_TESTS)
    errored = {
        m.group(1)
        for line in result.outlines
        if (m := re.search(r"\[(gw\d+)\].*ERROR .*test_speed\[", line))
    }
    assert errored == {"gw0", "gw1"}, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*no speed verdict: the quality gate of 'endpoint' failed*canary 'ping'*",
            "*quality gate FAIL*",
        ]
    )
    # Nothing was measured, but the session's one record says why (the gate's failure).
    record = only_record(results)
    (res,) = record["results"]
    assert res["figures"] == []
    assert res["community"]["Quality check"].startswith("FAILED (no speed verdict)")
    assert any("canary 'ping'" in r for r in record["session"]["invalid_reasons"])
    assert record["lab"]["gates"]["endpoint"]["passed"] is False
    assert not [p for p in (pytester.path / "xdist" / "baselines").rglob("*") if p.is_file()]
    # A refused baseline update fails the session.
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*baseline update REFUSED*"])


def test_a_worker_that_dies_loses_nothing_it_measured(
    pytester: pytest.Pytester, qfile: Path
) -> None:
    pytester.makepyfile(test_zz_crash=CRASH)
    # One worker runs every test in order: six figures, then it dies.
    result, _, results = session(pytester, "right", qfile, "xdist", "-n", "1")
    result.assert_outcomes(passed=SPEED_TESTS + 1, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw0' crashed*"])
    (res,) = only_record(results)["results"]
    assert len(res["figures"]) == SPEED_TESTS
    assert sum("stub_tok_s_" in line for line in verdict_table(result)) == SPEED_TESTS


COUNT_JUDGEMENTS = """
import os
import servelab.judging

_judge = servelab.judging.judge


def _counted(fig, *args, **kwargs):
    with open(os.environ["JUDGEMENTS_FILE"], "a") as f:
        f.write(f"{os.getpid()} {fig.metric}\\n")
    return _judge(fig, *args, **kwargs)


servelab.judging.judge = _counted
"""


def test_each_figure_is_judged_once_under_xdist(
    pytester: pytest.Pytester, qfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process of the session (controller and workers) counts its judgements in one
    file: each figure is judged once, on the worker that measured it, never again by the
    controller."""
    counts = pytester.path / "judgements.txt"
    monkeypatch.setenv("JUDGEMENTS_FILE", str(counts))
    pytester.makeconftest(COUNT_JUDGEMENTS)
    result, _, results = session(pytester, "right", qfile, "xdist", "-n", "2")
    result.assert_outcomes(passed=SPEED_TESTS + 1)
    judged = [line.split()[1] for line in counts.read_text().splitlines()]
    assert sorted(judged) == sorted(f"stub_tok_s_{i}" for i in range(SPEED_TESTS))
    # ... and the verdict each worker gave travels to the record unchanged.
    (res,) = only_record(results)["results"]
    assert {f["verdict"]["status"] for f in res["figures"]} == {"no baseline"}


# ------------------------------------------------- issue 25: receipts and stops in the record

#: Two decode tests on one managed stand-in engine: under ``-n 2`` each worker runs one.
TWO_DECODES = """
import pytest
from servelab import workloads

@pytest.mark.parametrize("i", range(2))
def test_decode(servelab_endpoint, servelab_profile, i):
    settings = workloads.Settings.for_limits(
        servelab_profile.limits, first_token_timeout_s=10, progress=False
    )
    workloads.decode(
        servelab_endpoint, prompt_tokens=8, output_tokens=4, runs=3, settings=settings
    )
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist"])
def test_every_record_carries_both_receipts_and_each_engines_stop(
    pytester: pytest.Pytester, xdist: bool
) -> None:
    """Issue 25: a session's record holds each target's admission and post-run receipts,
    their difference and how its engine stopped, with and without xdist. Under ``-n 2`` the
    shared engine is stopped by the controller: it used to do that after the record was
    written, so the record had neither the stop nor the post-run receipt."""
    from tests.test_faults import PROFILE, STUB, leftovers, pids_alive, wait_for

    path = pytester.path
    profiles = path / "profiles"
    profiles.mkdir()
    pids = path / "pids-stub.txt"
    profile = PROFILE.format(name="stub", mode="ok", stub=STUB, pids=pids)
    (profiles / "stub.toml").write_text(profile)
    (path / "test_inner.py").write_text(TWO_DECODES)
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error", "-rA"]
    args += ["--profiles-dir", str(profiles), "--profile", "stub", "test_inner.py"]
    args += ["-n", "2", "-v"] if xdist else []
    search = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(search), "COLUMNS": "400"}
    done = subprocess.Popen(
        args, cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = done.communicate(timeout=180)
    finally:
        if done.poll() is None:
            done.kill()
            done.communicate()
    assert done.returncode == pytest.ExitCode.OK, out
    if xdist:
        assert "[gw0]" in out and "[gw1]" in out, out  # both workers used the engine
    lab = only_record(path / "results")["lab"]
    receipts, stops = lab["receipts"], lab["stops"]
    assert set(receipts) == {"stub"} and set(stops) == {"stub"}, (receipts, stops, out)
    assert {"admission", "post_run", "difference"} <= set(receipts["stub"]), receipts
    assert receipts["stub"]["admission"]["problems"] == []
    assert receipts["stub"]["post_run"]["problems"] == []
    stop = stops["stub"]
    assert stop["clean_stop"] is True and stop["signal"] == "SIGTERM", stop
    assert stop["forced"] is False and stop["seconds"] < 10, stop
    engine = [int(x) for x in pids.read_text().split()]
    assert stop["pid"] == engine[0]
    assert not pids_alive(engine)
    # Under xdist the engine's watchdog is a worker's child: it sees the group gone within
    # its 0.5 s poll (longer on a loaded machine) and exits by itself.
    assert wait_for(lambda: leftovers(str(path), done.pid) == [], 15), leftovers(
        str(path), done.pid
    )


def test_an_interrupted_session_still_records_the_stop_and_the_post_run_receipt(
    pytester: pytest.Pytester,
) -> None:
    """SIGTERM mid-test (a CI cancel): the engine is stopped in pytest's own end-of-session
    teardown, which used to run after servelab wrote the record; now the record follows it."""
    from tests.test_faults import WAITING, Session, pids_alive

    s = Session(pytester.path, {"stub": "ok"}, WAITING)
    try:
        s.wait_marker()
        engine = s.engine_pids("stub")
        s.proc.send_signal(signal.SIGTERM)
        code, out, _ = s.finish()
    finally:
        for pid in pids_alive(s.engine_pids("stub")):
            os.kill(pid, signal.SIGKILL)
    assert code == pytest.ExitCode.INTERRUPTED, out
    record = s.record()
    lab = record["lab"]
    assert isinstance(lab, dict)
    assert {"admission", "post_run", "difference"} <= set(lab["receipts"]["stub"]), out
    assert lab["stops"]["stub"]["pid"] == engine[0], lab["stops"]
    assert not pids_alive(engine)
    assert s.leftovers() == []
