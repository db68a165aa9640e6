"""Closed-loop concurrency sweep on the profile's shape: at each level c, 2c requests (or
the profile's count) with at most c in flight, all due at once.

Per level: vLLM's output throughput and median TPOT, and the lab's wall aggregate.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from servelab import metrics, workloads
from servelab.figures import Figure, Identity, Shape
from servelab.plugin import Options, RunState
from servelab.profiles import ConcurrencyShape, Limits, Profile
from servelab.records import request_row
from servelab.server import Endpoint

pytestmark = pytest.mark.perf

EXTERNAL_SHAPE = ConcurrencyShape(levels=(1, 2, 4), prompt_tokens=32, output_tokens=32)


def test_concurrency_sweep(
    servelab_endpoint: Endpoint,
    servelab_profile: Profile | None,
    servelab_identity: Identity,
    servelab_options: Options,
    servelab_record: Callable[[Figure], Figure],
    servelab_state: RunState,
) -> None:
    shape = (servelab_profile.workloads.concurrency if servelab_profile else None) or EXTERNAL_SHAPE
    limits = servelab_profile.limits if servelab_profile else Limits()
    settings = workloads.Settings(timeout_s=limits.request_timeout_s)
    runs = servelab_options.runs or shape.runs
    sweeps = [
        workloads.concurrency_sweep(
            servelab_endpoint,
            levels=shape.levels,
            prompt_tokens=shape.prompt_tokens,
            output_tokens=shape.output_tokens,
            requests_per_level=shape.requests_per_level,
            warmup_requests=1 if i == 0 else 0,
            settings=settings,
        )
        for i in range(runs)
    ]
    servelab_state.requests += [
        request_row(r, test="test_concurrency_sweep", run=i, concurrency=c)
        for i, sweep in enumerate(sweeps)
        for c, res in sweep.items()
        for r in res.records
    ]
    problems = [
        f"run {i}, c{c}: {why}"
        for i, sweep in enumerate(sweeps)
        for c, res in sweep.items()
        for why in res.invalid_reasons(limits.max_error_rate)
    ]
    if problems:
        pytest.fail("concurrency runs are not valid:\n" + "\n".join(problems), pytrace=False)

    throughput: dict[int, float] = {}
    for c in shape.levels:
        per_run = [metrics.compute(s[c].records, s[c].start_ns, s[c].end_ns) for s in sweeps]
        fig_shape = Shape(shape.prompt_tokens, shape.output_tokens, concurrency=c)
        common = {"shape": fig_shape, "warm": True, "identity": servelab_identity}
        figs = [
            Figure(
                metric=f"output_throughput_c{c}",
                title=f"output throughput at concurrency {c}",
                unit="tok/s",
                direction="higher",
                runs=tuple(m.output_throughput for m in per_run),
                definition="sum of usage.completion_tokens / run duration (vLLM "
                "output_throughput; duration = dispatch start to last request done)",
                **common,  # type: ignore[arg-type]
            ),
            Figure(
                metric=f"median_tpot_ms_c{c}",
                title=f"median time per output token at concurrency {c}",
                unit="ms",
                direction="lower",
                runs=tuple(m.tpot_ms.median if m.tpot_ms else float("nan") for m in per_run),
                definition="median over requests of (E2EL - TTFT) / (N - 1) (vLLM TPOT)",
                **common,  # type: ignore[arg-type]
            ),
            Figure(
                metric=f"wall_aggregate_tok_s_c{c}",
                title=f"wall aggregate output rate at concurrency {c}",
                unit="tok/s",
                direction="higher",
                runs=tuple(m.wall_aggregate_tok_s or float("nan") for m in per_run),
                definition="sum of completion tokens / (max end - min send) (b70 lab)",
                **common,  # type: ignore[arg-type]
            ),
        ]
        for fig in figs:
            servelab_record(fig)
            print(fig.label())
        for m in per_run:
            assert m.completed > 0 and m.output_throughput > 0
            # Closed loop at c with 2c requests all due at once: the cap is reached exactly.
            assert m.peak_concurrency == min(c, m.completed)
        v = figs[0].value
        assert v is not None
        throughput[c] = v
    assert set(throughput) == set(shape.levels)
