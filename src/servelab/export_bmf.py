"""Bencher Metric Format (BMF) JSON of a record's figures, for `bencher run --adapter json`.

BMF is `{benchmark: {measure: {"value": v, "lower_value": lo, "upper_value": hi}}}`. A
benchmark is one profile at one shape (prompt, output, context tokens, concurrency) and
state (warm or cold): its name carries those labels. A measure is named after the metric
family (the shape suffix the name carries, `_c4`, `_p128`, left out: the benchmark name has
it), so one Bencher measure follows one metric across shapes. The value is the figure's
median over runs, the bounds its lowest and highest run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from servelab.catalogue import family_of
from servelab.figures import Figure
from servelab.record_files import record_figures


def benchmark_name(fig: Figure) -> str:
    s = fig.shape
    parts = [fig.identity.profile]
    if s.prompt_tokens is not None:
        parts.append(f"prompt {s.prompt_tokens}")
    if s.output_tokens is not None:
        parts.append(f"output {s.output_tokens}")
    if s.context_tokens is not None:
        parts.append(f"context {s.context_tokens}")
    parts.append(f"c{s.concurrency}")
    parts.append("warm" if fig.warm else "cold")
    return " / ".join(parts)


def measure_name(fig: Figure) -> str:
    return f"{family_of(fig)} ({fig.unit})"


def to_bmf(record: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The record's figures with a value (a figure without any finite run is left out:
    BMF has no "missing")."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for fig, _ in record_figures(record):
        finite = [v for v in fig.runs if math.isfinite(v)]
        if fig.value is None or not finite:
            continue
        out.setdefault(benchmark_name(fig), {})[measure_name(fig)] = {
            "value": fig.value,
            "lower_value": min(finite),
            "upper_value": max(finite),
        }
    return out
