"""The engine's Prometheus ``/metrics``: a pure text-format parser, a scrape, and the deltas
that matter for a workload (scraped before and after it).

vLLM's names (0.32; the CPU build serves the same set): counters
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (tokens),
``vllm:external_prefix_cache_*`` (KV connector, e.g. the lab's CPU KV offload),
``vllm:num_preemptions_total``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``; the gauge ``vllm:kv_cache_usage_perc`` (0..1); the
histogram ``vllm:request_queue_time_seconds`` (its ``_sum``/``_count``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from servelab.errors import ClientError

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LINE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_ESC = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

#: Counters whose increase over a workload is recorded (summed over label sets).
COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_queue_time_seconds_count",
)
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"


def _unescape(s: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _ESC[m.group(0)], s)


def _value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(text)


def parse(text: str, *, source: str = "/metrics") -> Samples:
    """Parse the Prometheus text exposition format (0.0.4) into {(name, labels): value}.

    Comments and blank lines are skipped; a malformed sample line raises ClientError naming
    its line number (a server that serves garbage is not silently read as "no data").
    """
    out: Samples = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ClientError(f"{source}: line {n} is not a Prometheus sample: {raw[:200]!r}")
        name, body, value = m.group(1), m.group(2), m.group(3)
        labels: list[tuple[str, str]] = []
        if body:
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                if lm is None:
                    raise ClientError(f"{source}: line {n}: malformed labels {{{body[:200]}}}")
                labels.append((lm.group(1), _unescape(lm.group(2))))
                pos = lm.end()
                if lm.group(3) == "" and pos < len(body):
                    raise ClientError(f"{source}: line {n}: malformed labels {{{body[:200]}}}")
        try:
            v = _value(value)
        except ValueError:
            raise ClientError(f"{source}: line {n}: value {value!r} is not a number") from None
        out[(name, tuple(sorted(labels)))] = v
    return out


def total(samples: Samples, name: str) -> float | None:
    """Sum of a metric over its label sets; None when the server does not export it."""
    values = [v for (n, _), v in samples.items() if n == name]
    return sum(values) if values else None


def labels_of(samples: Samples, name: str) -> dict[str, str] | None:
    """The labels of an info-style metric (e.g. vllm:cache_config_info)."""
    for (n, labels), _ in samples.items():
        if n == name:
            return dict(labels)
    return None


def scrape(
    base_url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0
) -> Samples:
    url = base_url.rstrip("/") + "/metrics"
    try:
        r = httpx.get(url, headers=dict(headers or {}), timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        raise ClientError(f"{url}: scrape failed: {exc}") from exc
    if r.status_code != 200:
        raise ClientError(f"{url}: HTTP {r.status_code}; this server exports no Prometheus metrics")
    return parse(r.text, source=url)


@dataclass(frozen=True)
class MetricsDelta:
    """What a workload did to the engine, from two scrapes. Missing is None, never 0."""

    counters: Mapping[str, float | None]  # increase of each COUNTERS entry
    kv_usage_before: float | None
    kv_usage_after: float | None

    def get(self, name: str) -> float | None:
        return self.counters.get(name)

    @property
    def prefix_hit_rate(self) -> float | None:
        """Share of queried prompt tokens served from the local prefix cache."""
        q = self.get("vllm:prefix_cache_queries_total")
        h = self.get("vllm:prefix_cache_hits_total")
        return None if q is None or h is None or q <= 0 else h / q

    @property
    def external_hit_rate(self) -> float | None:
        q = self.get("vllm:external_prefix_cache_queries_total")
        h = self.get("vllm:external_prefix_cache_hits_total")
        return None if q is None or h is None or q <= 0 else h / q

    @property
    def mean_queue_time_s(self) -> float | None:
        s = self.get("vllm:request_queue_time_seconds_sum")
        c = self.get("vllm:request_queue_time_seconds_count")
        return None if s is None or c is None or c <= 0 else s / c

    def describe(self) -> str:
        def fmt(v: float | None, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        return (
            f"prefix-cache hits {fmt(self.get('vllm:prefix_cache_hits_total'), '.0f')}/"
            f"{fmt(self.get('vllm:prefix_cache_queries_total'), '.0f')} tokens "
            f"(rate {fmt(self.prefix_hit_rate, '.1%')}); external hits "
            f"{fmt(self.get('vllm:external_prefix_cache_hits_total'), '.0f')}; preemptions "
            f"{fmt(self.get('vllm:num_preemptions_total'), '.0f')}; mean queue time "
            f"{fmt(self.mean_queue_time_s, '.4f')} s; KV usage "
            f"{fmt(self.kv_usage_before, '.1%')} -> {fmt(self.kv_usage_after, '.1%')}"
        )


def delta(before: Samples, after: Samples) -> MetricsDelta:
    """Counter increases between two scrapes. A counter that went down means the engine
    restarted between them: that is an error, not a negative delta."""
    counters: dict[str, float | None] = {}
    for name in COUNTERS:
        a, b = total(before, name), total(after, name)
        if a is None or b is None:
            counters[name] = None
            continue
        if b < a:
            raise ClientError(
                f"/metrics: counter {name} fell from {a} to {b} during the workload; the "
                "engine restarted (or another server answered the second scrape)"
            )
        counters[name] = b - a
    return MetricsDelta(
        counters=counters,
        kv_usage_before=total(before, KV_USAGE),
        kv_usage_after=total(after, KV_USAGE),
    )


RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


@dataclass(frozen=True)
class Peaks:
    """What a sampler saw while a workload ran (gauges move back once it ends)."""

    samples: int
    kv_usage_max: float | None
    running_max: float | None
    waiting_max: float | None
    stalled_samples: int  # requests waiting while none ran: the lab's "stalled" signal
    longest_stall: int  # most consecutive stalled samples
    interval_s: float

    @property
    def longest_stall_s(self) -> float:
        return self.longest_stall * self.interval_s

    def describe(self) -> str:
        kv = "n/a" if self.kv_usage_max is None else f"{self.kv_usage_max:.1%}"
        return (
            f"peak KV usage {kv}, peak running {self.running_max}, peak waiting "
            f"{self.waiting_max}, stalled samples {self.stalled_samples} of {self.samples} "
            f"(longest {self.longest_stall_s:.1f} s)"
        )


class Sampler:
    """Scrape ``/metrics`` every ``interval_s`` on a thread while a workload runs.

    Used around workloads that are not timing-critical for the client (the session cache):
    parsing on a thread competes with the client's event loop for the interpreter.
    """

    def __init__(
        self, base_url: str, headers: Mapping[str, str] | None = None, interval_s: float = 0.5
    ) -> None:
        import threading

        self.base_url = base_url
        self.headers = dict(headers or {})
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seen: list[Samples] = []
        self.failed = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._seen.append(scrape(self.base_url, self.headers, timeout_s=5.0))
            except ClientError:
                self.failed += 1  # counted, so an empty result is explained
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)

    def peaks(self) -> Peaks:
        return peaks_of(self._seen, self.interval_s)


def peaks_of(seen: list[Samples], interval_s: float) -> Peaks:
    def mx(name: str) -> float | None:
        values = [v for s in seen if (v := total(s, name)) is not None]
        return max(values) if values else None

    flags = [(total(s, WAITING) or 0) > 0 and total(s, RUNNING) == 0 for s in seen]
    longest = run = 0
    for f in flags:
        run = run + 1 if f else 0
        longest = max(longest, run)
    return Peaks(len(seen), mx(KV_USAGE), mx(RUNNING), mx(WAITING), sum(flags), longest, interval_s)
