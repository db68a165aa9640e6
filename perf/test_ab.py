"""Interleaved A/B of single-stream decode in one session (issue 19, docs/verdicts.md §1).

Side A is the selected profile's server; side B is another profile's (``--ab-profile
NAME``, started beside it: on a 2-core CPU both stay up and are measured alternately, never
at once; admitted, gated and stopped exactly as A: `servelab.plugin_fixtures.side_target`)
or A's server through the delaying proxy (`servelab.delay_proxy`) adding a
fraction of A's measured TPOT to every token (``--ab-slowdown 0.05``: an honest stand-in
for a 5 % slower engine; ``0``: A/A, B is A's endpoint itself). One run is one decode
request; its value is the request's median TPOT. Runs come in randomized ABBA / BAAB
blocks and the verdict on the blocks' log ratios is sequential (`servelab.sequential`): it
stops as soon as it is decided (regression, improvement, no change larger than the
threshold) or at the run budget (``--ab-max-runs``; ``--ab-deadline S`` ends it sooner),
and says which, the runs spent and the change they resolve. A regression fails the test.

``--ab-bisect BUILDS`` (`test_ab_bisect_decode`) bisects an ordered list of builds after A
(profiles, or stand-in slowdowns as above) for the first one regressed against A, each step
one such A/B (`servelab.ab_bisect`); the first regressed build goes into the record.
Skipped unless an A/B option is given.

    .venv/bin/pytest -m perf perf/test_ab.py --ab-slowdown 0.05 --ab-output-tokens 24
    .venv/bin/pytest -m perf perf/test_ab.py --profile cpu-smollm2 --ab-profile my-copy
    .venv/bin/pytest -m perf perf/test_ab.py --ab-bisect 0,0.3,0.3 --ab-output-tokens 24
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator

import numpy as np
import pytest

from servelab import ab, ab_bisect, metrics, sequential, workloads
from servelab.delay_proxy import delayed
from servelab.loadgen import RunResult
from servelab.plugin_fixtures import side_target
from servelab.plugin_measure import Measurement
from servelab.plugin_options import ABOptions
from servelab.profiles import DecodeShape
from servelab.server import Endpoint

pytestmark = [pytest.mark.perf]
needs_pair = pytest.mark.skipif(
    "config.getoption('--ab-profile') is None and config.getoption('--ab-slowdown') is None",
    reason="interleaved A/B runs only with --ab-profile NAME or --ab-slowdown FRACTION",
)
needs_builds = pytest.mark.skipif(
    "config.getoption('--ab-bisect') is None",
    reason="the A/B bisect runs only with --ab-bisect BUILDS",
)

#: Run noise the default budget is sized for: this 2-core CPU's (docs/verdicts.md).
CPU_RUN_NOISE = 0.10
EXTERNAL_SHAPE = DecodeShape(prompt_tokens=32, output_tokens=64, runs=3)
CALIBRATION_RUNS = 3  # A's TPOT before the stand-in's delay is set (not judged)


@contextlib.contextmanager
def side_b(
    opts: ABOptions, a: Endpoint, request: pytest.FixtureRequest, tpot_ms: float
) -> Iterator[tuple[Endpoint, str]]:
    """Side B's endpoint and a label for it."""
    if opts.profile is not None:
        yield side_target(request, opts.profile), f"profile {opts.profile.name!r}"
        return
    assert opts.slowdown is not None
    with delayed(a, opts.slowdown * tpot_ms / 1000) as b:
        yield b, build_label(opts.slowdown, tpot_ms)


def build_label(slowdown: float, tpot_ms: float) -> str:
    """A stand-in build's label: A itself, or A through the proxy."""
    if slowdown == 0:
        return "A itself (A/A)"
    return (
        f"A through a proxy adding {slowdown * tpot_ms:.2f} ms a token "
        f"({slowdown:.0%} of A's {tpot_ms:.1f} ms TPOT)"
    )


@dataclasses.dataclass
class Runs:
    """One A/B run (one decode request, its median TPOT) as every test here measures it."""

    m: Measurement
    shape: DecodeShape

    def measure(self, endpoint: Endpoint, side: str, i: int) -> RunResult:
        settings = dataclasses.replace(
            self.m.settings,
            nonce=f"ab-{side}-{i}-{time.time_ns()}",
            progress=False,
            check_server_cache=False,  # a /metrics scrape a run: time, and nothing judged
        )
        (res,) = workloads.decode(
            endpoint,
            prompt_tokens=self.shape.prompt_tokens,
            output_tokens=self.shape.output_tokens,
            runs=1,
            warmup_requests=0,
            settings=settings,
        )
        return res

    def one(self, endpoint: Endpoint, side: str, i: int) -> float:
        # A run the client itself timed badly (its event loop woke late: another process
        # took the CPU) is measured once again, as the other perf tests do.
        kept = self.m.keep(
            [({"side": side, "run": i}, self.measure(endpoint, side, i))],
            remeasure=lambda labels: [
                ({**x, "again": True}, self.measure(endpoint, side, i)) for x in labels
            ],
        )
        res = kept[-1][1]
        tpot = metrics.compute(res.records, res.start_ns, res.end_ns).tpot_ms
        return float("nan") if tpot is None else float(tpot.median)

    @property
    def metric(self) -> str:
        return f"median_tpot_ms p{self.shape.prompt_tokens}/o{self.shape.output_tokens}"


def _set_up(m: Measurement) -> tuple[ABOptions, Runs, sequential.Plan, int, int]:
    opts = m.options.ab
    assert opts is not None  # the skipif marks
    shape = m.shape("decode", EXTERNAL_SHAPE)
    shape = dataclasses.replace(shape, output_tokens=opts.output_tokens or shape.output_tokens)
    budget = opts.max_runs or sequential.units_needed(CPU_RUN_NOISE) * sequential.RUNS_PER_UNIT
    plan = sequential.plan(sequential.Design(max_units=budget // sequential.RUNS_PER_UNIT))
    seed = opts.seed if opts.seed is not None else time.time_ns() % 2**32
    return opts, Runs(m, shape), plan, budget, seed


@needs_pair
def test_ab_decode(servelab_measure: Measurement, request: pytest.FixtureRequest) -> None:
    m = servelab_measure
    opts, runs, plan, budget, seed = _set_up(m)
    a = m.endpoint
    calibration = [runs.one(a, "calibration", i) for i in range(CALIBRATION_RUNS)]
    with side_b(opts, a, request, statistics.median(calibration)) as (b, label):
        runs.one(b, "warmup-B", 0)  # B's first request (a fresh server or proxy) not judged
        m.progress(f"A/B: A = {m.name}, B = {label}; budget {budget} runs, seed {seed}")

        def told(blocks: int, v: sequential.SequentialVerdict) -> None:
            if blocks % 5 == 0 or v.decided:
                m.progress(f"A/B block {blocks}: {v.outcome}, runs {v.runs}")

        result = ab.run_ab(
            lambda i: runs.one(a, "A", i),
            lambda i: runs.one(b, "B", i),
            plan,
            "lower",
            np.random.default_rng(seed),
            deadline_s=opts.deadline_s,
            on_block=told,
        )
    text = f"{runs.metric}, B = {label}: {result.describe()}"
    m.progress(text)
    print(f"\nA {[round(x, 2) for x in result.a]}\nB {[round(x, 2) for x in result.b]}\n{text}")
    request.node.user_properties.append(("servelab_ab", text))
    m.results.ab[request.node.nodeid] = {  # into the record's lab section
        "target_a": m.name,
        "target_b": label,
        "metric": runs.metric,
        "summary": text,
        **dataclasses.asdict(result),
    }
    if result.verdict.outcome == "regression":
        pytest.fail(text, pytrace=False)


@needs_builds
def test_ab_bisect_decode(servelab_measure: Measurement, request: pytest.FixtureRequest) -> None:
    """The first build of ``--ab-bisect`` regressed against A; the answer (or why there is
    none) and every step's A/B go into the record. Passes when the search ends with an
    answer (a regression found is the answer asked for, not a failure); fails when a step
    is undecided (the budget or the deadline ran out)."""
    m = servelab_measure
    opts, runs, plan, budget, seed = _set_up(m)
    a = m.endpoint
    tpot_ms = statistics.median(runs.one(a, "calibration", i) for i in range(CALIBRATION_RUNS))
    labels = [f"A ({m.name})"] + [
        build_label(b, tpot_ms) if isinstance(b, float) else f"profile {b.name!r}"
        for b in opts.bisect
    ]
    builds = [ab_bisect.Build(i, label) for i, label in enumerate(labels)]
    m.progress(f"A/B bisect over {len(builds)} builds; budget {budget} runs a step, seed {seed}")
    with contextlib.ExitStack() as stack:
        endpoints: dict[int, Endpoint] = {0: a}

        def measure_of(build: ab_bisect.Build) -> ab.Measure:
            if build.index not in endpoints:  # set up before the step's first block
                spec = opts.bisect[build.index - 1]
                endpoints[build.index] = (
                    stack.enter_context(delayed(a, spec * tpot_ms / 1000))
                    if isinstance(spec, float)
                    else side_target(request, spec)
                )
                runs.one(endpoints[build.index], f"warmup-{build.index}", 0)
            endpoint = endpoints[build.index]
            return lambda i: runs.one(endpoint, f"build{build.index}", i)

        def told(step: ab_bisect.Step[ab_bisect.Build]) -> None:
            m.progress(f"A/B bisect: #{step.index} {step.build}: {step.result.describe()}")

        found = ab_bisect.bisect_builds(
            builds, measure_of, plan, "lower", np.random.default_rng(seed), on_step=told
        )
    text = f"{runs.metric}: {found.describe()}"
    m.progress(text)
    print(f"\n{text}")
    request.node.user_properties.append(("servelab_ab_bisect", text))
    m.results.ab[request.node.nodeid] = {  # into the record's lab section
        "target_a": m.name,
        "metric": runs.metric,
        "summary": text,
        "bisect": found.to_dict(),
    }
    if not found.answered:
        pytest.fail(text, pytrace=False)
