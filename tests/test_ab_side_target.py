"""Issue 19: side B of an A/B (``--ab-profile``; a profile build of ``--ab-bisect``) gets what
side A gets: an admission receipt before its engine starts, its `Target` in the results, the
quality gate (once per session, its report kept and written), its engine stopped by the
session's pool with the stop recorded, and a post-run receipt. A whole session through the
plugin against two stand-in engines (`tests/fakes/engine_stub.py`, as in tests/test_faults.py),
the inner test calling `servelab.plugin_fixtures.side_target` exactly as perf/test_ab.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_faults import PROFILE, STUB, leftovers, pids_alive

ROOT = Path(__file__).resolve().parents[1]

INNER = """
from servelab.client import completion_payload
from servelab.loadgen import run_requests
from servelab.plugin_fixtures import side_target


def test_side_b(servelab_endpoint, servelab_options, servelab_state, request):
    b_profile = servelab_options.ab.profile
    b = side_target(request, b_profile)
    assert side_target(request, b_profile) == b  # once a session: the same server
    assert b.base_url != servelab_endpoint.base_url
    for endpoint in (servelab_endpoint, b):
        res = run_requests(endpoint, [completion_payload(endpoint.model, "hi", 4)], progress=False)
        assert res.records[0].success, res.records[0].error
    assert set(servelab_state.gates) == {"stub-a", "stub-b"}
"""


def test_side_b_is_admitted_gated_stopped_and_receipted_as_side_a(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.path
    profiles = path / "profiles"
    profiles.mkdir()
    pids = {name: path / f"pids-{name}.txt" for name in ("stub-a", "stub-b")}
    for name, pid_file in pids.items():
        text = PROFILE.format(name=name, mode="ok", stub=STUB, pids=pid_file)
        (profiles / f"{name}.toml").write_text(text)
    (path / "test_inner.py").write_text(INNER)
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error", "-rA"]
    args += ["--profiles-dir", str(profiles), "--profile", "stub-a", "--ab-profile", "stub-b"]
    args += ["test_inner.py"]
    search = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(search), "COLUMNS": "400"}
    done = subprocess.Popen(
        args, cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, _ = done.communicate(timeout=120)
    assert done.returncode == pytest.ExitCode.OK, out
    records = sorted((path / "results" / "records").glob("*/record.json"))
    assert records, out
    record = json.loads(records[-1].read_text())
    lab = record["lab"]
    for name in ("stub-a", "stub-b"):
        receipts, stop = lab["receipts"][name], lab["stops"][name]
        assert {"admission", "post_run", "difference"} <= set(receipts), (name, receipts)
        assert receipts["admission"]["problems"] == [] == receipts["post_run"]["problems"]
        assert stop["clean_stop"] is True and stop["forced"] is False, (name, stop)
        assert (path / "results" / f"quality-{name}.json").exists(), name
        assert not pids_alive([int(x) for x in pids[name].read_text().split()])
    assert {t["profile"] for t in record["results"]} == {"stub-a", "stub-b"}
    assert set(lab["gates"]) == {"stub-a", "stub-b"}
    assert leftovers(str(path), done.pid) == []
