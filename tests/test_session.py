"""One home for a session's results: serialization, merging worker parts, judging once."""

from __future__ import annotations

import json

import pytest

from servelab.baselines import Fingerprint, Verdict
from servelab.errors import RecordError
from servelab.figures import Figure, Identity, Shape
from servelab.gate_report import CheckResult, GateReport
from servelab.hardware import StackIdentity
from servelab.session import SessionResults
from servelab.target import Target

IDENT = Identity("b70-gemma", "vllm 0.32.0", "host-1", "gemma")
TARGET = Target(
    IDENT,
    Fingerprint("host-1", "vllm 0.32.0", "gemma", args_hash="ab12"),
    StackIdentity("vllm 0.32.0", "vllm", "0.32.0", None, (("fix.patch", "cd" * 32),)),
    41.5,
)


def fig(metric: str, unit: str, value: float, direction: str = "higher") -> Figure:
    return Figure(
        metric=metric,
        title=metric,
        unit=unit,
        direction=direction,  # type: ignore[arg-type]
        runs=(value * 0.99, value, value * 1.01),
        shape=Shape(128, 64, 1),
        warm=True,
        identity=IDENT,
    )


def gate_report(passed: bool) -> GateReport:
    return GateReport(
        "b70-gemma",
        None,
        None,
        7,
        (CheckResult("canaries", passed, "0/8" if not passed else "8/8"),),
    )


def test_session_results_round_trip_through_json() -> None:
    res = SessionResults(
        targets={"b70-gemma": TARGET},
        verdicts=[
            Verdict(fig("decode_output_tok_s", "tok/s", 12.0), "no baseline", "no baseline at x"),
            Verdict(fig("ttft_ms", "ms", 80.0, direction="lower"), "refused", "other stack"),
        ],
        gates={"b70-gemma": gate_report(False)},
        metrics={"perf/t.py::a": "not recorded: HTTP 404"},
        invalid_reasons=["quality gate [b70-gemma] canaries: wrong"],
        requests=[{"test": "test_decode", "ttft_ns": 5, "tokens": (1, 2)}],
    )
    back = SessionResults.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.figures == res.figures
    assert back.verdicts == res.verdicts  # each figure keeps the verdict it was given
    assert back.targets == res.targets
    assert back.gates == res.gates
    assert back.quality_checks == ["[b70-gemma] canaries: FAIL - 0/8"]
    assert back.requests == [{"test": "test_decode", "ttft_ns": 5, "tokens": [1, 2]}]
    assert back.invalid_reasons == res.invalid_reasons


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"kind": "servelab-record"}, "not servelab session results"),
        ({"verdicts": [{"figure": {"metric": "x"}}]}, "malformed"),
        ({"targets": {"p": {"identity": "soon"}}}, "malformed"),
    ],
)
def test_session_results_refuse_malformed_data(edit: dict[str, object], message: str) -> None:
    data = {**SessionResults().to_dict(), **edit}
    with pytest.raises(RecordError, match=message):
        SessionResults.from_dict(data)


def test_merge_keeps_every_measurement_and_states_shared_facts_once() -> None:
    a, b, c = (fig(m, "tok/s", v) for m, v in (("a", 1.0), ("b", 2.0), ("b", 2.0)))
    reason = "quality gate [b70-gemma] canaries: wrong"
    attached = Target(TARGET.identity, TARGET.fingerprint, TARGET.stack, None)
    one = SessionResults(
        targets={"b70-gemma": attached},
        verdicts=[Verdict(a, "no baseline", ""), Verdict(b, "no baseline", "")],
        gates={"b70-gemma": gate_report(False)},
        metrics={"t.py::a": "x", "t.py::b": "y"},
        invalid_reasons=[reason],
        requests=[{"i": 0}],
    )
    two = SessionResults(
        targets={"b70-gemma": TARGET},
        verdicts=[Verdict(c, "no baseline", "")],
        gates={"b70-gemma": gate_report(False)},
        metrics={"t.py::c": "z"},
        session_cache={"s": 1},
        invalid_reasons=[reason, "engine died"],
        requests=[{"i": 1}, {"i": 2}],
    )
    merged = SessionResults.merge([one, two])
    assert merged.figures == [a, b, c]  # equal figures from two tests are two measurements
    # The startup time comes from the worker that started the server.
    assert merged.targets["b70-gemma"].startup_seconds == 41.5
    assert merged.invalid_reasons == [reason, "engine died"]
    assert merged.quality_checks == ["[b70-gemma] canaries: FAIL - 0/8"]
    assert [r["i"] for r in merged.requests] == [0, 1, 2]
    assert merged.metrics == {"t.py::a": "x", "t.py::b": "y", "t.py::c": "z"}
    assert merged.session_cache == {"s": 1}


def test_ab_verdicts_reach_the_record_and_survive_xdist() -> None:
    """An interleaved A/B verdict (perf/test_ab.py) is kept by node id in the record's lab
    section, through a saved part and a merge of two workers' parts."""
    entry = {"a": "cpu-smollm2", "b": "proxy +5%", "summary": "regression", "a_runs": [1.0]}
    one = SessionResults(ab={"perf/test_ab.py::test_ab_decode[cpu-smollm2]": entry})
    assert one.has_data()
    back = SessionResults.from_dict(json.loads(json.dumps(one.to_dict())))
    assert back.lab()["ab"] == one.ab
    merged = SessionResults.merge([SessionResults(), back])
    assert merged.ab == one.ab
    assert SessionResults.from_dict({**one.to_dict(), "ab": {}}).ab == {}
    old = one.to_dict()
    del old["ab"]  # a part saved before A/B verdicts were kept
    assert SessionResults.from_dict(old).ab == {}
