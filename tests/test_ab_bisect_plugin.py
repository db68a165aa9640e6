"""Issue 19 item 4 through pytest: ``--ab-bisect`` runs perf/test_ab.py::test_ab_bisect_decode,
which bisects stand-in builds (the delaying proxy in front of the scripted stand-in server,
10 ms a token, reached as ``--endpoint``) and writes the first regressed build into the
record's ``lab.ab``. Builds after A: +100 %, +100 % of A's TPOT, so the answer is build #1
after two A/B steps (the "no change" move of the search is tested in tests/test_ab_bisect.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import scripted_server

ROOT = Path(__file__).resolve().parents[1]
NODE = "perf/test_ab.py::test_ab_bisect_decode"

# About 40-60 s (a whole inner session: pytest, the gate, about 70 runs), and on a host so
# loaded that the client's event loop lags (the validity rule of every perf run) it fails
# as a perf test would: out of the default run.
pytestmark = pytest.mark.slow


def test_ab_bisect_option_finds_the_first_slow_build_and_records_it(tmp_path: Path) -> None:
    quality = tmp_path / "quality.toml"
    quality.write_text("schema_version = 1\nseed = 1\n")  # the stand-in has no canaries
    with scripted_server.process(2, 10) as endpoint:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", NODE, "-m", "perf", "-q", "-p", "no:cacheprovider",
             "--endpoint", endpoint.base_url, "--quality-file", str(quality),
             "--ab-bisect", "1,1", "--ab-output-tokens", "8", "--ab-seed", "1",
             f"--results-dir={tmp_path / 'results'}", f"--baselines-dir={tmp_path / 'b'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = (tmp_path / "results" / "records").glob("*/record.json")
    (node, entry), *_ = json.loads(path.read_text())["lab"]["ab"].items()
    assert node.startswith(NODE)
    found = entry["bisect"]
    assert found["first_bad"] == 1 and found["last_good"] == 0 and found["answered"] is True
    assert found["first_bad_build"].startswith("A through a proxy adding ")
    assert "(100% of A's" in found["first_bad_build"]
    assert found["builds"][0] == "A (endpoint)" and len(found["builds"]) == 3
    assert [s["index"] for s in found["steps"]] == [2, 1]
    assert [s["verdict"]["outcome"] for s in found["steps"]] == ["regression"] * 2
    assert entry["metric"] == "median_tpot_ms p32/o8"
    assert "first regressed build: #1" in entry["summary"] and "first regressed build: #1" in (
        out.stdout
    )
