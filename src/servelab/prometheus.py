"""The engine's Prometheus ``/metrics``: parsed with ``prometheus_client``'s parsers (the
Prometheus text format 0.0.4 and OpenMetrics 1.0, exemplars and float timestamps included), a
scrape, and the deltas that matter for a workload (scraped before and after it).
(Over 400 lines: parsing, scraping and reading the engine's counters and gauges, deltas and
the idle check included, are one concept: the engine's own account of a workload.)

vLLM's names (0.32; the CPU build serves the same set): counters
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (tokens),
``vllm:external_prefix_cache_*`` (KV connector, e.g. the lab's CPU KV offload),
``vllm:num_preemptions_total``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``; the gauge ``vllm:kv_cache_usage_perc`` (0..1); the
histogram ``vllm:request_queue_time_seconds`` (its ``_sum``/``_count``).

Those are servelab's names for what an engine did. llama.cpp's ``llama-server --metrics``
exports ``llamacpp:*``; `canonical` adds servelab's names for the ones that mean the same
(`LLAMACPP`), keeping the engine's own beside them. A name with no counterpart (llama.cpp has
no KV-usage gauge, no preemption counter) stays missing: None, never 0.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from prometheus_client import parser as text_parser
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser

from servelab.errors import ClientError

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

OPENMETRICS_TYPE = "application/openmetrics-text"
EOF_LINE = "# EOF"

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
# What the parsers raise on text they cannot read (ValueError almost always; an index or
# type error on a few truncated forms).
_PARSE_ERRORS = (ValueError, IndexError, TypeError)
# Only to word an error message; parsing is prometheus_client's.
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def is_openmetrics(text: str, content_type: str | None = None) -> bool:
    """OpenMetrics when the server says so, or when the text ends with ``# EOF``."""
    if content_type is not None:
        return content_type.split(";", 1)[0].strip().lower() == OPENMETRICS_TYPE
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and lines[-1].strip() == EOF_LINE


def _families(text: str, openmetrics: bool) -> list[Metric]:
    if openmetrics:
        return list(openmetrics_parser.text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
    return list(text_parser.text_string_to_metric_families(text))


def parse(text: str, *, source: str = "/metrics", content_type: str | None = None) -> Samples:
    """Parse a ``/metrics`` page into {(name, labels): value}.

    Prometheus text (0.0.4) or OpenMetrics (chosen by ``content_type``, else by a final
    ``# EOF`` line). Exemplars and timestamps (integer or float) are read and dropped; only
    the sample values are kept. A page that does not parse raises ClientError naming the
    first bad line (a server that serves garbage is not silently read as "no data").
    """
    openmetrics = is_openmetrics(text, content_type)
    try:
        families = _families(text, openmetrics)
    except _PARSE_ERRORS as exc:
        raise ClientError(_describe_error(text, source, openmetrics, exc)) from None
    out: Samples = {}
    for family in families:
        for s in family.samples:
            if s.value is None:  # a native histogram: no scalar value
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return canonical(out)


#: llama.cpp counter or gauge -> servelab's (vLLM's) name for the same quantity.
LLAMACPP = {
    "llamacpp:prompt_tokens_cached_total": "vllm:prefix_cache_hits_total",
    "llamacpp:tokens_predicted_total": "vllm:generation_tokens_total",
    "llamacpp:requests_processing": "vllm:num_requests_running",
    "llamacpp:requests_deferred": "vllm:num_requests_waiting",
    "llamacpp:spec_decode_num_draft_tokens_total": "vllm:spec_decode_num_draft_tokens_total",
    "llamacpp:spec_decode_num_accepted_tokens_total": (
        "vllm:spec_decode_num_accepted_tokens_total"
    ),
}
# llamacpp:prompt_tokens_total excludes cached tokens; vLLM's prompt counter and its
# prefix-cache queries count every prompt token: processed + cached.
_LLAMACPP_PROMPT = ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total")


def canonical(samples: Samples) -> Samples:
    """``samples`` plus servelab's names for an engine's own (llama.cpp: `LLAMACPP`)."""
    if not any(name.startswith("llamacpp:") for name, _ in samples):
        return samples
    out = dict(samples)
    for (name, labels), value in samples.items():
        target = LLAMACPP.get(name)
        if target is not None:
            out.setdefault((target, labels), value)
    processed, cached = (samples.get((n, ())) for n in _LLAMACPP_PROMPT)
    if processed is not None and cached is not None:
        for target in ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total"):
            out.setdefault((target, ()), processed + cached)
    return out


def _describe_error(text: str, source: str, openmetrics: bool, exc: BaseException) -> str:
    """The first bad line and why; the parser's own words where no line can be named."""
    said = str(exc)
    lines = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and line != EOF_LINE]
    if openmetrics:
        # OpenMetrics lines depend on their family (# TYPE, timestamps within a group), so a
        # line is not checked alone: the parser's message quotes the line it refused.
        fragment = said.rsplit(": ", 1)[-1].strip()  # the messages end with what they refused
        for n, line in lines:
            if said.endswith(line) or (len(fragment) >= 3 and fragment in line):
                return f"{source}: line {n} is not valid OpenMetrics: {said[:300]}"
        return f"{source}: not valid OpenMetrics text ({said[:300]})"
    for n, line in lines:
        try:
            _families(line + "\n", openmetrics=False)
        except _PARSE_ERRORS:
            return f"{source}: line {n}{_line_problem(line)}"
    return f"{source}: not valid Prometheus text ({said[:300]}); starts {text[:200]!r}"


def _close_brace(s: str) -> int:
    """Index of the first '}' outside a quoted label value; -1 when there is none."""
    quoted = escaped = False
    for i, ch in enumerate(s):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = quoted
        elif ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return i
    return -1


def _line_problem(line: str) -> str:
    """Why one line is not a sample: bad labels, a value that is not a number, or neither."""
    shown = repr(line[:200])
    if line.startswith("#"):
        return f" is a malformed comment line (# HELP / # TYPE): {shown}"
    cut = min((i for i in (line.find("{"), line.find(" "), line.find("\t")) if i >= 0), default=-1)
    name = line if cut < 0 else line[:cut]
    if not _NAME.fullmatch(name):
        return f" is not a Prometheus sample: {shown}"
    rest = line[len(name) :]
    if rest.startswith("{"):
        end = _close_brace(rest)
        if end < 0:
            return f" is not a Prometheus sample: {shown}"
        try:
            _families(f"x{rest[: end + 1]} 1\n", openmetrics=False)
        except _PARSE_ERRORS:
            return f": malformed labels {rest[: end + 1][:200]}"
        rest = rest[end + 1 :]
    words = rest.split()
    if not words:
        return f" is not a Prometheus sample (no value): {shown}"
    try:
        float(words[0])
    except ValueError:
        return f": value {words[0]!r} is not a number"
    return f" is not a Prometheus sample: {shown}"


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
    return parse(r.text, source=url, content_type=r.headers.get("content-type"))


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


# --------------------------------------------------------------------------- idle check


@dataclass(frozen=True)
class EngineLoad:
    """The engine's load gauges at one scrape; a gauge it does not export is None."""

    running: float | None
    waiting: float | None
    kv_usage: float | None  # 0..1

    @classmethod
    def of(cls, samples: Samples) -> EngineLoad:
        return cls(total(samples, RUNNING), total(samples, WAITING), total(samples, KV_USAGE))

    def describe(self) -> str:
        kv = "n/a" if self.kv_usage is None else f"{self.kv_usage:.2%}"
        return f"running {self.running}, waiting {self.waiting}, KV usage {kv}"

    def busy(self, idle: EngineLoad, kv_tolerance: float = 0.0) -> list[str]:
        """Why the engine is not back at `idle` (empty: it is): requests still running or
        waiting, or KV usage above its idle level by more than `kv_tolerance`. A gauge
        missing from either scrape is said so, never taken as 0."""
        out = [
            f"{name} {value:g} > 0"
            for name, value in (("running", self.running), ("waiting", self.waiting))
            if value is not None and value > 0
        ]
        out += [
            f"{name} not exported"
            for name, value in (("running", self.running), ("waiting", self.waiting))
            if value is None
        ]
        if self.kv_usage is None or idle.kv_usage is None:
            out.append(f"{KV_USAGE} not exported: KV release cannot be checked")
        elif self.kv_usage > idle.kv_usage + kv_tolerance:
            out.append(
                f"KV usage {self.kv_usage:.2%} > its idle level {idle.kv_usage:.2%}"
                + (f" + {kv_tolerance:.2%}" if kv_tolerance else "")
            )
        return out


@dataclass(frozen=True)
class Settled:
    """How an engine came back to idle after a workload (`wait_until_idle`)."""

    idle: bool
    after_s: float  # from the call to the first idle scrape (or to giving up)
    scrapes: int
    last: EngineLoad
    why_busy: tuple[str, ...]  # at the last scrape; empty when idle

    def describe(self) -> str:
        if self.idle:
            return (
                f"back to idle {self.after_s * 1000:.0f} ms after the run ({self.last.describe()})"
            )
        return (
            f"not idle {self.after_s:.1f} s after the run ({'; '.join(self.why_busy)}; "
            f"{self.scrapes} scrapes)"
        )


def wait_until_idle(
    base_url: str,
    idle: EngineLoad,
    headers: Mapping[str, str] | None = None,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    kv_tolerance: float = 0.0,
) -> Settled:
    """Scrape ``/metrics`` every `interval_s` until no request runs or waits and KV usage is
    back to the `idle` level (what an engine that released every request's blocks shows),
    or `timeout_s` passes."""
    t0 = time.perf_counter_ns()
    scrapes = 0
    while True:
        load = EngineLoad.of(scrape(base_url, headers, timeout_s=5.0))
        scrapes += 1
        why = load.busy(idle, kv_tolerance)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        if not why or elapsed >= timeout_s:
            return Settled(not why, elapsed, scrapes, load, tuple(why))
        time.sleep(interval_s)
