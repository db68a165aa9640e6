"""Shared runs (perf/shared_runs.py), the machinery of the client-at-GPU-rates check, against
the scripted stand-in: a server with exact latencies (no real engine has them), so what the
two clients read apart is their own doing. vLLM's request function is the installed vLLM's.
"""

from __future__ import annotations

import json
import statistics

import httpx
import pytest
from perf.shared_runs import (
    SecondClientMissing,
    SecondJob,
    SharedRun,
    load_second_client,
    paired_runs,
    second_values,
    shared_run,
)

from servelab.client import completion_payload
from tests.fakes import scripted_server

TTFT_MS, ITL_MS, OUTPUT = 40.0, 8.0, 16
GAP = 0.005  # s between the first requests (wider than the 1 ms default: visible on 2 cores)


def test_both_clients_share_each_run_and_read_the_script_alike() -> None:
    pytest.importorskip("vllm.benchmarks.lib.endpoint_request_func")
    level, runs = 8, 3
    with scripted_server.process(TTFT_MS, ITL_MS) as ep:

        def inputs(r: int) -> tuple[list[dict[str, object]], SecondJob]:
            job = SecondJob(
                None,
                ep.api_base + "/completions",
                "scripted",
                tuple(f"run{r} second {i}" for i in range(2 * level)),
                level,
                4,
                OUTPUT,
                True,
            )
            mine = [f"run{r} servelab {i}" for i in range(2 * level)]
            return [completion_payload("scripted", t, OUTPUT) for t in mine], job

        def each(r: int, run: SharedRun, mine: dict[str, float], second: dict[str, float]) -> None:
            assert run.servelab.invalid_reasons(0.0) == []
            # The same run: the two clients' first requests reached the server together, and
            # each client's requests overlapped the other's (the server's own receipt times).
            log = json.loads(httpx.get(ep.base_url + "/log", timeout=10).text)
            got = {
                side: sorted(
                    v["received_ns"] for k, v in log.items() if k.startswith(f"run{r} {side} ")
                )
                for side in ("servelab", "second")
            }
            assert len(got["servelab"]) == len(got["second"]) == 2 * level
            # Within a quarter of one request's scripted time (168 ms): 8-15 ms on a busy 2-core
            # host, each client's own time from its start to its first request on the wire.
            assert abs(got["servelab"][0] - got["second"][0]) < 42e6
            assert got["servelab"][0] < got["second"][-1] and got["second"][0] < got["servelab"][-1]
            # Each side's first `level` requests went out one gap apart (interleaved, not a
            # burst): they span at least most of (level - 1) gaps (a sleep only runs late).
            for side in got.values():
                assert side[level - 1] - side[0] >= 0.8 * (level - 1) * GAP * 1e9

        pairs = paired_runs(
            ep, runs, inputs, 4, level, OUTPUT, timeout_s=30.0, each=each, gap_s=GAP
        )
    ours, theirs = pairs.ours, pairs.theirs
    # Each client reads the script (TPOT is the gap; TTFT the script plus the request's trip).
    for side in (ours, theirs):
        for stat in ("median", "mean"):
            assert statistics.median(side[f"{stat}_tpot_ms"]) == pytest.approx(ITL_MS, abs=0.5)
            assert TTFT_MS <= statistics.median(side[f"{stat}_ttft_ms"]) < TTFT_MS + 25
    for check in pairs.checks.values():
        print(check.describe())
    for k in ("median_tpot_ms", "mean_tpot_ms"):
        assert pairs.checks[k].ok, pairs.checks[k].describe()


def test_a_second_client_that_is_not_there_is_named() -> None:
    """No vLLM module of that name and no file: the reason names what is missing."""
    with pytest.raises(SecondClientMissing, match="no such file"):
        load_second_client("/nonexistent/endpoint_request_func.py", "no_vllm_here.request_func")
    with pytest.raises(SecondClientMissing, match="no file names"):
        load_second_client(None, "no_vllm_here.request_func")


def test_a_second_client_that_fails_fails_the_run() -> None:
    """The second client's requests to a path the server does not serve: its outputs say they
    failed, and second_values refuses them, naming the error."""
    pytest.importorskip("vllm.benchmarks.lib.endpoint_request_func")
    with scripted_server.process(5, 2) as ep:
        job = SecondJob(
            None, ep.base_url + "/nowhere/completions", "scripted", ("a", "b"), 2, 1, 4, True
        )
        run = shared_run(
            ep,
            [completion_payload("scripted", t, 4) for t in ("x", "y")],
            1,
            2,
            job,
            timeout_s=10.0,
        )
        assert len(run.servelab.records) == 2 and not run.servelab.failed
        with pytest.raises(AssertionError, match="second client: 2 failed requests"):
            second_values(run.second, 4)
