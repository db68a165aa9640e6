"""Serving metrics from request records: vLLM's definitions, then the b70 lab's.
(Over 400 lines: both sets read the same records into one `RunMetrics`; the cross-walk to
vLLM's keys sits beside the definitions it checks.)

Pure functions: no I/O, no printing. Inputs are `client.RequestRecord`s (times in
``perf_counter_ns``) and the run's start/end; outputs are frozen records in milliseconds
and tokens per second, keyed like ``vllm bench serve`` (see ``docs/metrics.md``).

vLLM definitions (``vllm/benchmarks/serve.py::calculate_metrics``):

- TTFT = first token chunk - send; E2EL = last token chunk - send;
- TPOT = (E2EL - TTFT) / (N - 1) for N > 1, one value per request;
- ITL = every gap between token chunks of every successful request, pooled;
- throughputs divide by the run duration D; goodput counts requests meeting every SLO
  (value <= SLO, TPOT taken as 0 when N <= 1);
- mean, median, population std and ``np.percentile`` (linear) per metric.

Where vLLM reports 0 for "no data", servelab reports None.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 99.0)
#: The lab's promotion window: tokens 1..100 after the first token.
LAB_WINDOW = 100


class Record(Protocol):
    """What metrics read from a request record (`client.RequestRecord` satisfies it)."""

    @property
    def arrival_ns(self) -> int: ...
    @property
    def send_ns(self) -> int: ...
    @property
    def first_token_ns(self) -> int | None: ...
    @property
    def first_text_ns(self) -> int | None: ...
    @property
    def end_ns(self) -> int | None: ...
    @property
    def chunk_ns(self) -> tuple[int, ...]: ...
    @property
    def chunk_tokens(self) -> tuple[int | None, ...]: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def requested_prompt_tokens(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def success(self) -> bool: ...
    @property
    def output_tokens(self) -> int | None: ...


# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Distribution:
    """Summary of one metric's values (vLLM's aggregation: population std, linear pctl)."""

    count: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    percentiles: tuple[tuple[float, float], ...]

    def pct(self, p: float) -> float:
        for q, v in self.percentiles:
            if q == p:
                return v
        raise KeyError(f"percentile {p} was not computed (have {[q for q, _ in self.percentiles]})")


def distribution(
    values: Iterable[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> Distribution | None:
    """Summarize values; None when there are none (vLLM would report 0)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return None
    return Distribution(
        count=int(arr.size),
        mean=float(np.mean(arr)),
        median=float(np.median(arr)),
        std=float(np.std(arr)),
        min=float(np.min(arr)),
        max=float(np.max(arr)),
        percentiles=tuple((float(p), float(np.percentile(arr, p))) for p in percentiles),
    )


def percentile_key(p: float) -> str:
    """vLLM's spelling: integral percentiles print without a decimal (p99, p99.9)."""
    return str(int(p)) if int(p) == p else str(p)


# --------------------------------------------------------------------------- per request


def ttft_s(r: Record) -> float | None:
    return None if r.first_token_ns is None else (r.first_token_ns - r.send_ns) / 1e9


def lab_ttft_s(r: Record) -> float | None:
    """The lab's TTFT: first non-empty text delta (later than vLLM's after a role chunk)."""
    return None if r.first_text_ns is None else (r.first_text_ns - r.send_ns) / 1e9


def e2el_s(r: Record) -> float | None:
    return None if r.end_ns is None else (r.end_ns - r.send_ns) / 1e9


def queue_s(r: Record) -> float:
    """Client-side wait for a concurrency slot (vLLM's ``client_queue_time``)."""
    return (r.send_ns - r.arrival_ns) / 1e9


def output_len(r: Record) -> int:
    """N_i: usage.completion_tokens, else token_ids, else one per token chunk."""
    n = r.output_tokens
    return n if n is not None else len(r.chunk_ns)


def input_len(r: Record) -> int | None:
    """P_i: usage.prompt_tokens, else the requested length."""
    return r.prompt_tokens if r.prompt_tokens is not None else r.requested_prompt_tokens


def tpot_s(r: Record) -> float | None:
    """(E2EL - TTFT) / (N - 1); None for N <= 1 or a failed request."""
    n, t, e = output_len(r), ttft_s(r), e2el_s(r)
    if not r.success or n <= 1 or t is None or e is None:
        return None
    return (e - t) / (n - 1)


def itls_s(r: Record) -> list[float]:
    c = r.chunk_ns
    return [(c[i] - c[i - 1]) / 1e9 for i in range(1, len(c))]


def token_times_ns(r: Record) -> list[int]:
    """Arrival time of each output token: a chunk's time repeated for each of its tokens
    (token_ids); one token per chunk where the count is unknown; 0-token chunks (a chat
    role chunk) add none."""
    out: list[int] = []
    for ts, n in zip(r.chunk_ns, r.chunk_tokens, strict=False):
        out.extend([ts] * (1 if n is None else n))
    return out


def decode_rate(r: Record) -> float | None:
    """Single-stream decode tok/s, (N - 1) / (t_last - t_first) (= 1/TPOT)."""
    n = output_len(r)
    if not r.success or n <= 1 or r.first_token_ns is None or r.end_ns is None:
        return None
    dt = (r.end_ns - r.first_token_ns) / 1e9
    return (n - 1) / dt if dt > 0 else None


def after_ttft_rate(r: Record) -> float | None:
    """The lab's per-request after-TTFT rate N / (E2EL - TTFT_text)."""
    n = output_len(r)
    if not r.success or r.first_text_ns is None or r.end_ns is None:
        return None
    dt = (r.end_ns - r.first_text_ns) / 1e9
    return n / dt if dt > 0 else None


def window_rate(r: Record, window: int = LAB_WINDOW) -> float | None:
    """Tokens 1..window after TTFT: (window - 1) / (t_window - t_1) ("conventional");
    None when the request produced fewer than ``window`` tokens."""
    if not r.success:
        return None
    times = token_times_ns(r)
    if len(times) < window or window < 2:
        return None
    dt = (times[window - 1] - times[0]) / 1e9
    return (window - 1) / dt if dt > 0 else None


def prefill_rate(r: Record) -> float | None:
    """Prompt tokens / TTFT: a lower bound on prefill speed (TTFT also holds scheduling)."""
    p, t = input_len(r), ttft_s(r)
    if not r.success or p is None or t is None or t <= 0:
        return None
    return p / t


# --------------------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class ServingMetrics:
    """One run's metrics. Latencies in ms, rates in tokens (or requests) per second."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None  # None without SLOs
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2el_ms: Distribution | None
    client_queue_ms: Distribution | None
    max_output_tokens_per_s: float | None  # vLLM: fullest 1-s bucket of token chunks
    max_concurrent_requests: int | None  # vLLM: fullest 1-s bucket of active requests
    # --- the lab's
    peak_concurrency: int | None  # exact sweep-line maximum over [send, end)
    wall_aggregate_tok_s: float | None  # sum N / (max end - min send)
    aggregate_from_first_text_tok_s: float | None  # sum N / (max end - min first text)
    lab_ttft_ms: Distribution | None  # first non-empty text
    decode_tok_s: Distribution | None  # (N-1)/(t_last-t_first) per request
    after_ttft_tok_s: Distribution | None  # N/(end - first text) per request
    window_tok_s: Distribution | None  # tokens 1..window after TTFT, per request
    prefill_tok_s: Distribution | None  # P/TTFT per request
    window: int = LAB_WINDOW
    slos_ms: Mapping[str, float] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


def compute(
    records: Sequence[Record],
    start_ns: int,
    end_ns: int,
    *,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    slos_ms: Mapping[str, float] | None = None,
    window: int = LAB_WINDOW,
) -> ServingMetrics:
    """All metrics of one run whose dispatch started at ``start_ns`` and ended at ``end_ns``.

    ``slos_ms`` takes keys ``ttft``, ``tpot``, ``e2el`` (vLLM's ``--goodput``).
    """
    slos = dict(slos_ms or {})
    unknown = set(slos) - {"ttft", "tpot", "e2el"}
    if unknown:
        from servelab.errors import ConfigError

        raise ConfigError(
            f"goodput SLOs: unknown metric(s) {sorted(unknown)}; use ttft, tpot, e2el"
        )
    dur = (end_ns - start_ns) / 1e9
    ok = [r for r in records if r.success]
    ttfts = [t for r in ok if (t := ttft_s(r)) is not None]
    e2els = [e for r in ok if (e := e2el_s(r)) is not None]
    tpots = [t for r in ok if (t := tpot_s(r)) is not None]
    itls = [g for r in ok for g in itls_s(r)]
    n_out = [output_len(r) for r in ok]
    n_in = [input_len(r) or 0 for r in ok]
    total_out, total_in = sum(n_out), sum(n_in)

    goodput: float | None = None
    if slos:
        good = 0
        for r in ok:
            vals = {"ttft": ttft_s(r), "tpot": tpot_s(r) or 0.0, "e2el": e2el_s(r)}
            if all((vals[k] or 0.0) * 1000 <= v for k, v in slos.items()):
                good += 1
        goodput = good / dur if dur > 0 else None

    def ms(values: list[float]) -> Distribution | None:
        return distribution([v * 1000 for v in values], percentiles)

    def rate(x: float) -> float:
        return x / dur if dur > 0 else math.nan

    peak_tok, peak_req = _vllm_peaks(ok)
    starts = [r.send_ns for r in ok]
    ends = [r.end_ns for r in ok if r.end_ns is not None]
    texts = [r.first_text_ns for r in ok if r.first_text_ns is not None]
    wall = (max(ends) - min(starts)) / 1e9 if ok and ends else None
    from_text = (max(ends) - min(texts)) / 1e9 if ends and texts else None

    def per_req(values: Iterable[float | None]) -> Distribution | None:
        return distribution([v for v in values if v is not None], percentiles)

    return ServingMetrics(
        duration_s=dur,
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=rate(len(ok)),
        request_goodput=goodput,
        output_throughput=rate(total_out),
        total_token_throughput=rate(total_in + total_out),
        ttft_ms=ms(ttfts),
        tpot_ms=ms(tpots),
        itl_ms=ms(itls),
        e2el_ms=ms(e2els),
        client_queue_ms=ms([queue_s(r) for r in ok]),
        max_output_tokens_per_s=peak_tok,
        max_concurrent_requests=peak_req,
        peak_concurrency=sweep_peak([(r.send_ns, r.end_ns) for r in ok if r.end_ns])
        if ok
        else None,
        wall_aggregate_tok_s=total_out / wall if wall else None,
        aggregate_from_first_text_tok_s=total_out / from_text if from_text else None,
        lab_ttft_ms=ms([t for r in ok if (t := lab_ttft_s(r)) is not None]),
        decode_tok_s=per_req(decode_rate(r) for r in ok),
        after_ttft_tok_s=per_req(after_ttft_rate(r) for r in ok),
        window_tok_s=per_req(window_rate(r, window) for r in ok),
        prefill_tok_s=per_req(prefill_rate(r) for r in ok),
        window=window,
        slos_ms=slos,
        errors=tuple(str(r.error) for r in records if not r.success),
    )


def _vllm_peaks(ok: Sequence[Record]) -> tuple[float | None, int | None]:
    """vLLM's ``max_output_tokens_per_s`` and ``max_concurrent_requests``: token chunks and
    active requests counted in 1-s buckets from the earliest send."""
    done = [r for r in ok if r.end_ns is not None]
    if not done:
        return None, None
    t0 = min(r.send_ns for r in done)
    t_end = max(r.end_ns for r in done if r.end_ns is not None)
    buckets = math.ceil((t_end - t0) / 1e9) + 1
    tokens = np.zeros(buckets)
    active = np.zeros(buckets)
    for r in done:
        for ts in r.chunk_ns:
            b = int((ts - t0) / 1e9)
            if 0 <= b < buckets:
                tokens[b] += 1
        assert r.end_ns is not None
        first, last = int((r.send_ns - t0) / 1e9), int((r.end_ns - t0) / 1e9)
        active[first : last + 1] += 1
    return float(tokens.max()), int(active.max())


def sweep_peak(intervals: Iterable[tuple[int, int | None]]) -> int:
    """Exact maximum number of overlapping half-open intervals [start, end)."""
    events: list[tuple[int, int]] = []
    for s, e in intervals:
        if e is None:
            continue
        events.append((s, 1))
        events.append((e, -1))
    events.sort(key=lambda x: (x[0], x[1]))  # an end at t closes before a start at t opens
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


# --------------------------------------------------------------------------- windows


def steady_state_window(
    records: Sequence[Record], fraction: float = 0.95
) -> tuple[int, int] | None:
    """The longest span during which in-flight requests >= ``fraction`` x their maximum
    (Rust vllm-bench's steady state); None when there is no such span of positive length."""
    ok = [(r.send_ns, r.end_ns) for r in records if r.success and r.end_ns is not None]
    if not ok:
        return None
    peak = sweep_peak(ok)
    need = math.ceil(fraction * peak - 1e-9)
    events = sorted(
        [(s, 1) for s, _ in ok] + [(e, -1) for _, e in ok if e is not None],
        key=lambda x: (x[0], x[1]),
    )
    best: tuple[int, int] | None = None
    cur, since = 0, None
    for t, d in events:
        cur += d
        if cur >= need and since is None:
            since = t
        elif cur < need and since is not None:
            if t > since and (best is None or t - since > best[1] - best[0]):
                best = (since, t)
            since = None
    return best


def output_rate_in(records: Sequence[Record], window: tuple[int, int]) -> float | None:
    """Output tokens whose arrival falls in [start, end) of ``window``, per second."""
    start, end = window
    if end <= start:
        return None
    n = sum(1 for r in records if r.success for t in token_times_ns(r) if start <= t < end)
    return n / ((end - start) / 1e9)


# --------------------------------------------------------------------------- export


_DIST_KEYS = {
    "ttft": "ttft_ms",
    "tpot": "tpot_ms",
    "itl": "itl_ms",
    "e2el": "e2el_ms",
    "client_queue_time": "client_queue_ms",
}


def to_vllm_json(
    m: ServingMetrics,
    records: Sequence[Record] = (),
    *,
    percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el"),
) -> dict[str, Any]:
    """The run in ``vllm bench serve``'s result keys (None where vLLM would write 0).

    With ``records``, the per-request arrays of ``--save-detailed`` are included.
    """
    out: dict[str, Any] = {
        "duration": m.duration_s,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
    }
    for name in percentile_metrics:
        if name not in _DIST_KEYS:
            from servelab.errors import ConfigError

            raise ConfigError(
                f"percentile metric {name!r} unknown; choose from {sorted(_DIST_KEYS)}"
            )
        d: Distribution | None = getattr(m, _DIST_KEYS[name])
        out[f"mean_{name}_ms"] = d.mean if d else None
        out[f"median_{name}_ms"] = d.median if d else None
        out[f"std_{name}_ms"] = d.std if d else None
        for p, v in d.percentiles if d else ():
            out[f"p{percentile_key(p)}_{name}_ms"] = v
    if records:
        out["input_lens"] = [input_len(r) for r in records]
        out["output_lens"] = [output_len(r) if r.success else 0 for r in records]
        out["ttfts"] = [ttft_s(r) if r.success else None for r in records]
        out["itls"] = [itls_s(r) if r.success else [] for r in records]
        out["latencies"] = [e2el_s(r) if r.success else None for r in records]
        t0 = min(r.send_ns for r in records)
        out["start_times"] = [(r.send_ns - t0) / 1e9 for r in records]
        out["queue_times"] = [queue_s(r) for r in records]
        out["generated_texts"] = [getattr(r, "text", "") for r in records]
        out["errors"] = [r.error or "" for r in records]
    return out


def lab_json(m: ServingMetrics) -> dict[str, Any]:
    """The lab's metrics alongside (median per-request values, in tok/s and ms)."""

    def med(d: Distribution | None) -> float | None:
        return d.median if d else None

    return {
        "wall_aggregate_tok_s": m.wall_aggregate_tok_s,
        "aggregate_from_first_text_tok_s": m.aggregate_from_first_text_tok_s,
        "peak_concurrency": m.peak_concurrency,
        "median_lab_ttft_ms": med(m.lab_ttft_ms),
        "median_decode_tok_s": med(m.decode_tok_s),
        "median_after_ttft_tok_s": med(m.after_ttft_tok_s),
        f"median_tokens_1_{m.window}_tok_s": med(m.window_tok_s),
        "median_prefill_tok_s": med(m.prefill_tok_s),
    }
