"""Arrival schedules for open-loop load, computed before the run from a seeded generator.

Same process as vLLM's ``get_request``: inter-arrival gaps ~ Gamma(shape k, scale 1/(rate k))
(k = burstiness; k = 1 is Poisson, k < 1 burstier, k > 1 smoother, k = inf constant
spacing). Without ramp-up the arrival times are rescaled so the last one falls exactly at
N / rate (vLLM's normalization, which removes the seed-to-seed spread of summed gaps). With
a linear or exponential ramp the rate moves from ``start_rps`` to ``end_rps`` by progress
i / (N - 1), and no rescaling is done.

`vllm_seeded` gives the very arrival times ``vllm bench serve --seed S`` uses: it seeds
numpy's legacy global generator (``np.random.seed``) and draws the gaps from it, a different
stream from ``default_rng(S)``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from servelab.errors import ConfigError

Ramp = Literal["linear", "exponential"]


@dataclass(frozen=True)
class Schedule:
    """When each request becomes due, in seconds from the start of the run."""

    offsets_s: tuple[float, ...]
    rates_rps: tuple[float, ...]  # the rate in force for each request
    burstiness: float
    seed: int | None

    @property
    def span_s(self) -> float:
        return self.offsets_s[-1] if self.offsets_s else 0.0


def _rate_at(i: int, n: int, rate: float, ramp: Ramp | None, start: float, end: float) -> float:
    if ramp is None:
        return rate
    progress = i / max(n - 1, 1)
    if ramp == "linear":
        return start + (end - start) * progress
    return float(start * (end / start) ** progress)


def schedule(
    n: int,
    rate_rps: float,
    *,
    burstiness: float = 1.0,
    rng: np.random.Generator | np.random.RandomState | None = None,
    seed: int | None = 0,
    ramp: Ramp | None = None,
    start_rps: float | None = None,
    end_rps: float | None = None,
) -> Schedule:
    """Arrival offsets for ``n`` requests at ``rate_rps`` (``math.inf``: all at t = 0).

    Pass ``rng`` or ``seed`` (a ``numpy.random.default_rng(seed)`` is made).

    >>> s = schedule(4, 2.0, burstiness=math.inf)
    >>> s.offsets_s
    (0.5, 1.0, 1.5, 2.0)
    """
    if n < 1:
        raise ConfigError(f"arrival schedule: n must be >= 1 (got {n})")
    if not burstiness > 0:
        raise ConfigError(f"arrival schedule: burstiness must be > 0 (got {burstiness})")
    if ramp is not None:
        if start_rps is None or end_rps is None or start_rps <= 0 or end_rps <= 0:
            raise ConfigError(
                f"arrival schedule: ramp {ramp!r} needs positive start_rps and end_rps "
                f"(got {start_rps}, {end_rps})"
            )
        if ramp not in ("linear", "exponential"):
            raise ConfigError(f"arrival schedule: unknown ramp {ramp!r}; linear or exponential")
    elif not rate_rps > 0:
        raise ConfigError(f"arrival schedule: rate must be > 0 requests/s (got {rate_rps})")
    gen = rng if rng is not None else np.random.default_rng(seed)
    rates: list[float] = []
    gaps: list[float] = []
    for i in range(n):
        r = _rate_at(i, n, rate_rps, ramp, start_rps or 0.0, end_rps or 0.0)
        rates.append(r)
        if math.isinf(r):
            gaps.append(0.0)
        elif math.isinf(burstiness):
            gaps.append(1.0 / r)
        else:
            gaps.append(float(gen.gamma(shape=burstiness, scale=1.0 / (r * burstiness))))
    offsets = np.cumsum(gaps)
    if ramp is None and offsets[-1] != 0 and not math.isinf(rate_rps):
        offsets = offsets * ((n / rate_rps) / offsets[-1])
    return Schedule(tuple(float(x) for x in offsets), tuple(rates), burstiness, seed)


def vllm_seeded(n: int, rate_rps: float, *, burstiness: float = 1.0, seed: int = 0) -> Schedule:
    """`schedule` with ``vllm bench serve``'s generator for ``--seed seed`` (numpy's legacy
    ``RandomState``, which ``np.random.seed`` seeds): the same offsets its ``get_request``
    waits for, when nothing else draws from that generator first."""
    return schedule(n, rate_rps, burstiness=burstiness, rng=np.random.RandomState(seed), seed=seed)
