"""Interleaved A/B of single-stream decode in one session (issue 19, docs/verdicts.md §1).

Side A is the selected profile's server; side B is another profile's (``--ab-profile
NAME``, started beside it: on a 2-core CPU both stay up and are measured alternately, never
at once) or A's server through the delaying proxy of `perf/test_verdict_live.py` adding a
fraction of A's measured TPOT to every token (``--ab-slowdown 0.05``: an honest stand-in
for a 5 % slower engine; ``0``: A/A, B is A's endpoint itself). One run is one decode
request; its value is the request's median TPOT. Runs come in randomized ABBA / BAAB
blocks and the verdict on the blocks' log ratios is sequential (`servelab.sequential`): it
stops as soon as it is decided (regression, improvement, no change larger than the
threshold) or at the run budget (``--ab-max-runs``; ``--ab-deadline S`` ends it sooner),
and says which, the runs spent and the change they resolve. A regression fails the test.
Skipped unless an A/B option is given.

    .venv/bin/pytest -m perf perf/test_ab.py --ab-slowdown 0.05 --ab-output-tokens 24
    .venv/bin/pytest -m perf perf/test_ab.py --profile cpu-smollm2 --ab-profile my-copy
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest

from servelab import ab, metrics, sequential, workloads
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.plugin_options import ABOptions
from servelab.pool import ServerPool
from servelab.profiles import DecodeShape
from servelab.server import Endpoint

pytestmark = [
    pytest.mark.perf,
    pytest.mark.skipif(
        "config.getoption('--ab-profile') is None and config.getoption('--ab-slowdown') is None",
        reason="interleaved A/B runs only with --ab-profile NAME or --ab-slowdown FRACTION",
    ),
]

#: Run noise the default budget is sized for: this 2-core CPU's (docs/verdicts.md).
CPU_RUN_NOISE = 0.10
EXTERNAL_SHAPE = DecodeShape(prompt_tokens=32, output_tokens=64, runs=3)
CALIBRATION_RUNS = 3  # A's TPOT before the stand-in's delay is set (not judged)


@contextlib.contextmanager
def side_b(
    opts: ABOptions, a: Endpoint, pool: ServerPool, tpot_ms: float
) -> Iterator[tuple[Endpoint, str]]:
    """Side B's endpoint and a label for it."""
    if opts.profile is not None:
        yield pool.get(opts.profile).endpoint, f"profile {opts.profile.name!r}"
        return
    from perf.test_verdict_live import DelayingProxy

    assert opts.slowdown is not None
    if opts.slowdown == 0:  # A/A: the very same endpoint, no proxy in the way
        yield a, "A itself (A/A)"
        return
    delay_s = opts.slowdown * tpot_ms / 1000
    u = urlsplit(a.base_url)
    with DelayingProxy(u.hostname or "127.0.0.1", u.port or 80, delay_s) as proxy:
        b = dataclasses.replace(a, base_url=f"http://127.0.0.1:{proxy.listen_port}")
        yield (
            b,
            (
                f"A through a proxy adding {delay_s * 1000:.2f} ms a token "
                f"({opts.slowdown:.0%} of A's {tpot_ms:.1f} ms TPOT)"
            ),
        )


def test_ab_decode(
    servelab_measure: Measurement, servelab_pool: ServerPool, request: pytest.FixtureRequest
) -> None:
    m = servelab_measure
    opts = m.options.ab
    assert opts is not None  # the skipif above
    shape = m.shape("decode", EXTERNAL_SHAPE)
    output = opts.output_tokens or shape.output_tokens

    def measure(endpoint: Endpoint, side: str, i: int) -> RunResult:
        settings = dataclasses.replace(
            m.settings,
            nonce=f"ab-{side}-{i}-{time.time_ns()}",
            progress=False,
            check_server_cache=False,  # a /metrics scrape a run: time, and nothing judged
        )
        (res,) = workloads.decode(
            endpoint,
            prompt_tokens=shape.prompt_tokens,
            output_tokens=output,
            runs=1,
            warmup_requests=0,
            settings=settings,
        )
        return res

    def one_run(endpoint: Endpoint, side: str, i: int) -> float:
        # A run the client itself timed badly (its event loop woke late: another process
        # took the CPU) is measured once again, as the other perf tests do.
        kept = m.keep(
            [({"side": side, "run": i}, measure(endpoint, side, i))],
            remeasure=lambda labels: [
                ({**x, "again": True}, measure(endpoint, side, i)) for x in labels
            ],
        )
        res = kept[-1][1]
        tpot = metrics.compute(res.records, res.start_ns, res.end_ns).tpot_ms
        return float("nan") if tpot is None else float(tpot.median)

    a = m.endpoint
    calibration = [one_run(a, "calibration", i) for i in range(CALIBRATION_RUNS)]
    budget = opts.max_runs or sequential.units_needed(CPU_RUN_NOISE) * sequential.RUNS_PER_UNIT
    plan = sequential.plan(sequential.Design(max_units=budget // sequential.RUNS_PER_UNIT))
    seed = opts.seed if opts.seed is not None else time.time_ns() % 2**32
    with side_b(opts, a, servelab_pool, statistics.median(calibration)) as (b, label):
        one_run(b, "warmup-B", 0)  # B's first request (a fresh server or proxy) not judged
        m.progress(f"A/B: A = {m.name}, B = {label}; budget {budget} runs, seed {seed}")

        def told(blocks: int, v: sequential.SequentialVerdict) -> None:
            if blocks % 5 == 0 or v.decided:
                m.progress(f"A/B block {blocks}: {v.outcome}, runs {v.runs}")

        result = ab.run_ab(
            lambda i: one_run(a, "A", i),
            lambda i: one_run(b, "B", i),
            plan,
            "lower",
            np.random.default_rng(seed),
            deadline_s=opts.deadline_s,
            on_block=told,
        )
    text = f"median_tpot_ms p{shape.prompt_tokens}/o{output}, B = {label}: {result.describe()}"
    m.progress(text)
    print(f"\nA {[round(x, 2) for x in result.a]}\nB {[round(x, 2) for x in result.b]}\n{text}")
    request.node.user_properties.append(("servelab_ab", text))
    m.results.ab[request.node.nodeid] = {  # into the record's lab section
        "target_a": m.name,
        "target_b": label,
        "metric": f"median_tpot_ms p{shape.prompt_tokens}/o{output}",
        "summary": text,
        **dataclasses.asdict(result),
    }
    if result.verdict.outcome == "regression":
        pytest.fail(text, pytrace=False)
