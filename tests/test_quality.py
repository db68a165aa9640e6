"""Quality gate: quality-file validation, judging, and the gate against a streaming stub.

The stub below is an honest fake of an OpenAI-compatible *streaming* server whose answers the
test chooses (right, wrong, unstable); the point is servelab's gate logic and its wiring into
the perf suite, not the engine (perf/test_quality.py runs the gate on the real CPU server).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from servelab import recall
from servelab.errors import QualityGateError
from servelab.gate_report import GateReport
from servelab.profiles import Profile, default_profile_dirs, load_named
from servelab.quality import (
    Canary,
    GateLimits,
    load_quality_file,
    recheck_canaries,
    resolve_quality_path,
    run_gate,
)
from servelab.server import Endpoint
from servelab.xdist import SessionGates
from tests.fakes import sse

ROOT = Path(__file__).resolve().parents[1]
MODEL = "stub-model"

GOOD = """\
schema_version = 1
seed = 7
[recall]
api = "chat"
lead_in = "The answer_word for lane {label} is"
[[canary]]
id = "ping"
api = "chat"
prompt = "Say pong."
max_tokens = 8
expect = "pong"
[[canary]]
id = "seven"
api = "completion"
prompt = "3 + 4 ="
max_tokens = 4
match = '^\\s*7\\s*$'
"""


# --------------------------------------------------------------------------- quality file


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "q.toml"
    p.write_text(text)
    return p


def test_good_file_loads(tmp_path: Path) -> None:
    q = load_quality_file(write(tmp_path, GOOD))
    assert q.seed == 7
    assert [c.id for c in q.canaries] == ["ping", "seven"]
    assert q.recall.api == "chat" and "{label}" in q.recall.lead_in
    assert q.sha256 is not None and len(q.sha256) == 64


def test_repo_quality_files_load() -> None:
    for path in sorted((ROOT / "fixtures" / "quality").glob("*.toml")):
        q = load_quality_file(path)
        assert q.canaries, path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("max_tokens = 8\n", ""), r"canary #1 \('ping'\): missing field 'max_tokens'"),
        (("max_tokens = 8", 'max_tokens = "8"'), r"canary #1 \('ping'\): field 'max_tokens' must"),
        (("max_tokens = 8", "max_tokens = 0"), r"'max_tokens' must be >= 1"),
        (('expect = "pong"', 'expect = "pong"\nmatch = "pong"'), r"exactly one of 'expect'"),
        (('expect = "pong"', ""), r"exactly one of 'expect'"),
        (("match = '^\\s*7\\s*$'", "match = '(7'"), r"canary #2 \('seven'\): 'match' is not"),
        (('id = "seven"', 'id = "ping"'), r"canary #2: duplicate id 'ping'"),
        (('api = "completion"', 'api = "rest"'), r"canary #2 \('seven'\): field 'api'"),
        (
            ('prompt = "Say pong."', 'prompt = "Say pong."\nanswer = "x"'),
            r"unknown field\(s\) \['answer'\]",
        ),
        (('expect = "pong"', 'expect = " pong"'), r"surrounding whitespace"),
        (("schema_version = 1", "schema_version = 2"), r"'schema_version' must be 1"),
        (
            ('api = "chat"\nlead_in', 'api = "completion"\nlead_in'),
            r"\[recall\]: 'lead_in' applies",
        ),
        (("{label} is", "{lane} is"), r"\[recall\]: 'lead_in' .* placeholder \{label\}"),
        (('[[canary]]\nid = "seven"', '[canary]\nid = "seven"'), r"invalid TOML"),
    ],
)
def test_malformed_entries_are_named(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(QualityGateError, match=message) as info:
        load_quality_file(p)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QualityGateError, match="does not exist"):
        load_quality_file(tmp_path / "none.toml")


def test_paths_resolve_against_the_profile_folder(tmp_path: Path) -> None:
    profile = tmp_path / "profiles" / "x.toml"
    got = resolve_quality_path("../quality/q.toml", profile)
    assert got is not None and got.resolve() == (tmp_path / "quality" / "q.toml").resolve()
    assert resolve_quality_path("/abs/q.toml", profile) == Path("/abs/q.toml")
    assert resolve_quality_path(None, profile) is None


def test_judge_exact_close_and_regex() -> None:
    c = Canary("france", "chat", "q", 8, expect="The capital of France is Paris.")
    assert c.judge("The capital of France is Paris.") is None
    assert c.judge("  The capital of France is Paris.\n") is None
    close = c.judge("The capital of France is Paris")
    assert close is not None and "close but not exact" in close and "'france'" in close
    wrong = c.judge("Paris is nice.")
    assert wrong is not None and "(wrong)" in wrong
    r = Canary("seven", "chat", "q", 8, match=r"^\s*7\s*$")
    assert r.judge(" 7\n") is None
    miss = r.judge("77")
    assert miss is not None and "does not fully match" in miss


# --------------------------------------------------------------------------- stub server


class Stub:
    """Streaming OpenAI-compatible stub. ``mode``: right | wrong | unstable | drift (right,
    but after ``drift_after`` requests its "7" answer changes bytes: " 7" becomes "7 ",
    still right by the canary's regex, no longer the same answer)."""

    def __init__(self, mode: str, drift_after: int = 8) -> None:
        self.mode = mode
        self.drift_after = drift_after
        self.calls = 0
        self.pongs = 0
        self.bodies: list[dict[str, Any]] = []  # every completion request's body
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, text: str) -> str:
        with self.lock:
            self.calls += 1
            drifted = self.mode == "drift" and self.calls > self.drift_after
        lane = re.search(r"answer_word for lane (\w+)\?", text)
        if lane:
            word = recall.expected_word(lane.group(1))
            return " cedar" if self.mode == "wrong" else f" {word}."
        if "pong" in text:
            if self.mode == "wrong":
                return "pang"
            with self.lock:
                self.pongs += 1
                k = self.pongs
            return "pong" if self.mode in ("right", "drift") or k % 2 else "pong "
        if drifted:
            return "7 "
        return " 7" if self.mode != "wrong" else " 8"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class H(BaseHTTPRequestHandler):
            def _json(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._json(200, {})
                elif self.path == "/v1/models":
                    self._json(200, {"data": [{"id": MODEL}]})
                elif self.path == "/metrics":
                    text = f'vllm:prefix_cache_queries_total{{engine="0"}} {stub.calls * 10}\n'
                    data = text.encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self._json(404, {"error": self.path})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    text = json.dumps(body.get("prompt") or body.get("messages"))
                    self._json(200, {"count": len(text) // 4})
                    return
                if not self.path.endswith("/completions"):  # llama.cpp's /apply-template
                    self._json(404, {"error": self.path})
                    return
                chat = self.path.endswith("/chat/completions")
                stub.bodies.append(body)
                prompt = json.dumps(body["messages"]) if chat else body["prompt"]
                text = stub.answer(prompt)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if chat:
                    piece = {"index": 0, "delta": {"content": text}, "finish_reason": "stop"}
                    first = b"data: " + json.dumps({"choices": [piece]}).encode() + b"\n\n"
                else:
                    first = sse.chunk(text, finish_reason="stop")
                self.wfile.write(first + sse.usage(len(prompt) // 4, 2) + sse.DONE)

            def log_message(self, *a: Any) -> None:
                pass

        return H

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def qfile(tmp_path: Path) -> Path:
    return write(tmp_path, GOOD)


def gate(
    stub: Stub,
    qfile: Path,
    fraction: float = 1.0,
    lines: int | None = 12,
    profile: Profile | None = None,
) -> Any:
    return run_gate(
        Endpoint(base_url=stub.url, model=MODEL, profile=profile),
        "stub",
        load_quality_file(qfile),
        repeats=2,
        identity_fraction=fraction,
        recall_lines=lines,
        context_len=4096,
        timeout_s=10,
    )


def test_gate_passes_a_right_server(qfile: Path) -> None:
    with Stub("right") as stub:
        report = gate(stub, qfile)
    assert report.passed, report.reasons()
    assert [c.name for c in report.checks] == ["canaries", "identity", "recall"]
    canaries = report.checks[0]
    assert len(canaries.outcomes) == 2 * 4  # 2 canaries x (2 sequential + 2 concurrent)
    assert all(o.output_sha256 for o in canaries.outcomes)
    assert report.checks[2].summary.startswith("3/3 depths recalled exactly")
    assert report.to_dict()["passed"] is True


def test_gate_fails_a_wrong_server_with_reasons(qfile: Path) -> None:
    with Stub("wrong") as stub:
        report = gate(stub, qfile)
    assert not report.passed
    reasons = report.reasons()
    assert any("canary 'ping': expected 'pong', got 'pang'" in r for r in reasons)
    assert any(
        "recall early (lane A" in r and "expected 'maple', got 'cedar'" in r for r in reasons
    )
    assert all(r.startswith("quality gate [stub]") for r in reasons)


def test_gate_requests_carry_the_engines_own_fields(qfile: Path) -> None:
    """The gate's requests carry what the engine's measured requests carry
    (`EngineTraits.measured_extra`): on llama.cpp, cache_prompt false, so every canary and
    recall answer is computed afresh, not from a slot's prompt cache filled by a batch; on
    vLLM nothing is added."""
    llama = load_named(["cpu-llamacpp-smollm2"], default_profile_dirs())[0]
    for profile, want in ((llama, {False}), (None, {None})):
        with Stub("right") as stub:
            report = gate(stub, qfile, profile=profile)
            assert report.passed, report.reasons()
            assert len(stub.bodies) == 8 + 3  # 2 canaries x 4 asks, 3 recall depths
            assert {b.get("cache_prompt") for b in stub.bodies} == want


def test_identity_fraction_is_configurable(qfile: Path) -> None:
    # The unstable stub adds a trailing space to every other "pong": still right (stripped),
    # but not byte-identical.
    with Stub("unstable") as stub:
        strict = gate(stub, qfile, 1.0, lines=None)
    identity = strict.checks[1]
    assert strict.checks[0].passed
    assert not identity.passed and "differs from #1" in identity.problems[0]
    same, compared = (int(x) for x in identity.summary.split()[0].split("/"))
    assert 0 < same < compared
    with Stub("unstable") as stub:
        loose = gate(stub, qfile, 0.5, lines=None)
    assert loose.checks[1].passed


def test_recall_too_long_for_context_is_refused(qfile: Path) -> None:
    with Stub("right") as stub, pytest.raises(QualityGateError, match="profile 'stub'"):
        run_gate(
            Endpoint(base_url=stub.url, model=MODEL),
            "stub",
            load_quality_file(qfile),
            repeats=1,
            identity_fraction=1.0,
            recall_lines=400,
            context_len=1024,
            timeout_s=10,
        )


# --------------------------------------------------------------------------- perf wiring

SPEED = """
import pytest
pytestmark = pytest.mark.perf

from servelab.figures import Figure, Shape

def test_speed(servelab_endpoint, servelab_identity, servelab_record):
    servelab_record(Figure(
        metric="stub_tok_s", title="stub rate", unit="tok/s", direction="higher",
        runs=(100.0, 101.0, 99.0), shape=Shape(8, 8, 1), warm=True,
        identity=servelab_identity,
    ))

def test_gate_report(servelab_quality_gate):
    assert servelab_quality_gate.passed, servelab_quality_gate.reasons()
"""


@pytest.mark.parametrize("mode", ["right", "wrong"])
def test_wrong_server_never_gets_a_speed_verdict(
    pytester: pytest.Pytester, qfile: Path, mode: str
) -> None:
    pytester.makepyfile(test_speed=SPEED)
    with Stub(mode) as stub:
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "--endpoint",
            stub.url + "/v1",
            f"--quality-file={qfile}",
            f"--results-dir={pytester.path / 'results'}",
            f"--baselines-dir={pytester.path / 'baselines'}",
            "--update-baselines",
        )
    records = list((pytester.path / "results" / "records").glob("*/record.json"))
    sessions = [json.loads(r.read_text())["session"] for r in records]
    baselines = [p for p in (pytester.path / "baselines").rglob("*") if p.is_file()]
    if mode == "right":
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines(["*quality gate PASS*"])
        assert len(sessions) == 1 and sessions[0]["invalid_reasons"] == []
        assert any("canaries: pass" in q for q in sessions[0]["quality_checks"])
        assert baselines  # the update workflow writes when the gate passed
        return
    assert baselines == []  # ... and never when it failed
    # A failed gate leaves no figure; where a record is written it names the gate.
    for s in sessions:
        assert any(r.startswith("quality gate [endpoint] canaries") for r in s["invalid_reasons"])
    # The speed test errors in setup (it never runs); the gate's own test fails by name.
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*no speed verdict: the quality gate of 'endpoint' failed*canary 'ping'*",
            "*quality gate FAIL*",
        ]
    )
    saved = json.loads((pytester.path / "results" / "quality-endpoint.json").read_text())
    assert saved["gate"]["passed"] is False


def test_endpoint_without_quality_file_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_speed=SPEED)
    with Stub("right") as stub:
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "--endpoint",
            stub.url + "/v1",
        )
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*no quality file for an external endpoint*--quality-file*"])


def test_lab_records_serialise_for_the_record(qfile: Path) -> None:
    from servelab import prometheus
    from servelab.plugin_gate import _metrics_data
    from servelab.session import SessionResults

    with Stub("right") as stub:
        report = gate(stub, qfile, lines=None)
    lab = SessionResults()
    lab.gates["stub"] = report
    lab.metrics["perf/test_x.py::test_a[stub]"] = _metrics_data(
        prometheus.delta(
            prometheus.parse("vllm:prefix_cache_hits_total 1\n"),
            prometheus.parse("vllm:prefix_cache_hits_total 5\n"),
        )
    )
    lab.metrics["perf/test_x.py::test_b[stub]"] = "not recorded: HTTP 404"
    data = json.loads(json.dumps(lab.lab()))
    assert data["gates"]["stub"]["passed"] is True
    assert data["gates"]["stub"]["checks"][0]["name"] == "canaries"
    delta = data["metrics"]["perf/test_x.py::test_a[stub]"]
    assert delta["counters"]["vllm:prefix_cache_hits_total"] == 4.0
    assert "prefix-cache hits 4/n/a" in delta["summary"]
    assert data["metrics"]["perf/test_x.py::test_b[stub]"] == "not recorded: HTTP 404"


# --------------------------------------------------------------------------- xdist sharing


def test_gate_report_round_trips(qfile: Path) -> None:
    with Stub("wrong") as stub:
        report = gate(stub, qfile)
    back = GateReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back == report
    with pytest.raises(QualityGateError, match="malformed"):
        GateReport.from_dict({"target": "x"})


def test_shared_gates_run_each_target_once_per_folder(qfile: Path, tmp_path: Path) -> None:
    with Stub("wrong") as stub:
        first = SessionGates(tmp_path).run("stub", lambda: gate(stub, qfile))
        calls = stub.calls
        # Another worker of the same session: the saved failed report, its reasons intact.
        again = SessionGates(tmp_path).run("stub", lambda: gate(stub, qfile))
        assert stub.calls == calls
        other = SessionGates(tmp_path).run("other", lambda: gate(stub, qfile))
        assert stub.calls == 2 * calls  # another target has its own gate
        # Without a shared folder (no xdist) the gate simply runs.
        SessionGates(None).run("stub", lambda: gate(stub, qfile))
        assert stub.calls == 3 * calls
    assert not first.passed and again == first and again.reasons() == first.reasons()
    assert other.target == "stub"  # the report is whatever the gate returned


def test_shared_gates_share_an_error_too(tmp_path: Path) -> None:
    def broken() -> GateReport:
        raise QualityGateError("profile 'stub': recall prompt does not fit")

    with pytest.raises(QualityGateError, match="does not fit"):
        SessionGates(tmp_path).run("stub", broken)

    def not_again() -> GateReport:
        raise AssertionError("the gate ran twice")

    with pytest.raises(QualityGateError, match=r"^profile 'stub': recall prompt does not fit$"):
        SessionGates(tmp_path).run("stub", not_again)


def test_lab_records_adopt_another_process_reports(qfile: Path) -> None:
    from servelab.patches import FileStatus, PatchReport, PatchStatus
    from servelab.session import SessionResults, patch_report_from_dict

    with Stub("right") as stub:
        report = gate(stub, qfile, lines=None)
    worker = SessionResults()
    worker.gates["stub"] = report
    worker.patches["stub"] = PatchReport(
        "/site-packages",
        (
            PatchStatus(
                "fix.patch", "/p/fix.patch", "ab" * 32, (FileStatus("a.py", "applied", "cd"),)
            ),
        ),
    )
    worker.metrics["t.py::a"] = "not recorded: HTTP 404"
    back = SessionResults.from_dict(json.loads(json.dumps(worker.to_dict())))
    controller = SessionResults.merge([SessionResults(), back])
    assert controller.gates == worker.gates
    assert controller.patches == worker.patches
    assert controller.patches["stub"].all_applied
    with pytest.raises(QualityGateError, match="malformed"):
        patch_report_from_dict({"root": "/"})


# --------------------------------------------------------------------------- end of session


def test_canaries_asked_again_match_the_start_or_fail_as_changed(qfile: Path) -> None:
    """Issue 24 item 3: the gate's canaries asked again after the load; a changed answer
    fails even when it is still right by the canary's own judge."""
    qset = load_quality_file(qfile)
    for mode, ok in (("right", True), ("drift", False)):
        with Stub(mode) as stub:
            start = gate(stub, qfile, lines=None)  # 8 requests: 2 canaries x (2 + 2)
            assert start.passed, start.reasons()
            ep = Endpoint(base_url=stub.url, model=MODEL)
            check = recheck_canaries(ep, qset, start, limits=GateLimits(10))
        assert check.passed is ok, check.problems
        assert check.name == "canaries again" and len(check.outcomes) == 2
    assert check.summary.startswith("1/2 canary answers at the end of the session identical")
    (problem,) = check.problems
    assert problem.startswith("canary 'seven': the answer at the end of the session differs")
    assert "'7 '" in problem


END = (ROOT / "perf" / "test_zz_canaries_again.py").read_text()


@pytest.mark.parametrize("mode", ["right", "drift"])
def test_end_of_session_canaries_reach_the_record(
    pytester: pytest.Pytester, qfile: Path, mode: str
) -> None:
    """The perf module, run last after a speed test: its check joins the record's gates as
    "<target> (end of session)"; a change invalidates the session and refuses baselines."""
    pytester.makepyfile(test_speed=SPEED, test_zz_canaries_again=END)
    with Stub(mode, drift_after=8) as stub:
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "--endpoint",
            stub.url + "/v1",
            f"--quality-file={qfile}",
            f"--results-dir={pytester.path / 'results'}",
            f"--baselines-dir={pytester.path / 'baselines'}",
            "--update-baselines",
        )
    (path,) = (pytester.path / "results" / "records").glob("*/record.json")
    record = json.loads(path.read_text())
    end = record["lab"]["gates"]["endpoint (end of session)"]
    baselines = [p for p in (pytester.path / "baselines").rglob("*") if p.is_file()]
    result.stdout.fnmatch_lines(["*[[]endpoint (end of session)[]] quality gate *"])
    if mode == "right":
        result.assert_outcomes(passed=3)
        assert end["passed"] is True and record["session"]["invalid_reasons"] == []
        assert baselines
        return
    result.assert_outcomes(passed=2, failed=1)
    assert end["passed"] is False and not baselines
    reasons = record["session"]["invalid_reasons"]
    assert any("(end of session)] canaries again: canary 'seven'" in r for r in reasons), reasons
