"""The engine-kernels report and bundle files: round trip, regressions, tampering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servelab.errors import KernelInputError
from servelab.kernels.engine.bundle import ENGINE_FILES, load_bundle
from servelab.kernels.engine.report import Report, Row, compare_reports, load_report

pytestmark = [pytest.mark.kernels, pytest.mark.engine_kernels]


def test_report_round_trip_and_regression_verdicts(tmp_path: Path) -> None:
    old = Report("vllm 0.32.0", "cpu")
    old.add(Row("turboquant_4bit_nc", "random/decode_vs_dequantized", "pass", 2e-7, "1e-3"))
    old.add(Row("turboquant_4bit_nc", "codebook_vs_gaussian_lloyd_max", "fail", 1.7e-3, "1e-3"))
    new = Report("vllm 0.33.0", "cpu")
    new.add(Row("turboquant_4bit_nc", "random/decode_vs_dequantized", "fail", 3e-3, "1e-3"))
    new.add(Row("turboquant_4bit_nc", "codebook_vs_gaussian_lloyd_max", "pass", 1e-5, "1e-3"))
    new.add(Row("turboquant_4bit_nc", "constant/key_distortion", "figure", float("nan")))
    loaded = load_report(new.save(tmp_path / "r.json"))
    assert loaded.rows[2].figure is None  # NaN is stored as null, never as 0
    outcomes = [o[3] for o in compare_reports(old, loaded)]
    assert outcomes == ["regressed", "fixed", "new"]


def test_a_changed_engine_file_is_refused(engine_bundle: Any, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(engine_bundle.root, copy)
    assert load_bundle(copy).engine_version == engine_bundle.engine_version
    target = copy / ENGINE_FILES[0]
    target.write_text(target.read_text() + "\n# edited\n")
    with pytest.raises(KernelInputError, match="differs from"):
        load_bundle(copy)
