"""The metric catalogue: every figure the perf suite records, by family, with its title,
unit, better direction and definition, in one place.

Entries are keyed by their name template. A family's metric name may carry the shape's
varying axis (`output_throughput_c{c}`, `ttft_ms_p{n}`); `family_of` reads the family back
from a figure, so reports group one curve per family.
"""

from __future__ import annotations

from dataclasses import dataclass

from servelab.figures import Direction, Figure, Identity, Shape


@dataclass(frozen=True)
class MetricSpec:
    name: str  # format string over the shape's axis: "output_throughput_c{c}"
    title: str  # format string: "output throughput at concurrency {c}"
    unit: str
    direction: Direction
    definition: str

    def figure(
        self,
        runs: tuple[float, ...],
        *,
        shape: Shape,
        identity: Identity,
        warm: bool = True,
        notes: tuple[str, ...] = (),
        **axis: int | str,
    ) -> Figure:
        return Figure(
            metric=self.name.format(**axis),
            title=self.title.format(**axis),
            unit=self.unit,
            direction=self.direction,
            runs=runs,
            shape=shape,
            warm=warm,
            identity=identity,
            definition=self.definition,
            notes=notes,
        )


def _spec(name: str, title: str, unit: str, direction: Direction, definition: str) -> MetricSpec:
    return MetricSpec(name, title, unit, direction, definition)


CATALOGUE: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        _spec(
            "decode_tok_s",
            "single-stream decode rate",
            "tok/s",
            "higher",
            "(N - 1) / (t_last_token_chunk - t_first_token_chunk), one request per run "
            "(= 1000 / TPOT_ms); N = usage.completion_tokens",
        ),
        _spec(
            "median_tpot_ms",
            "time per output token (vLLM TPOT)",
            "ms",
            "lower",
            "(E2EL - TTFT) / (N - 1) per request, vLLM calculate_metrics",
        ),
        _spec(
            "ttft_ms_p{n}",
            "time to first token, {n}-token prompt",
            "ms",
            "lower",
            "first chunk with non-empty choices - send (vLLM TTFT); one request per value",
        ),
        _spec(
            "prefill_tok_s_p{n}",
            "prefill rate (lower bound), {n}-token prompt",
            "tok/s",
            "higher",
            "usage.prompt_tokens / TTFT per request (TTFT also holds scheduling and the first "
            "decode step, so this is a lower bound)",
        ),
        _spec(
            "output_throughput_c{c}",
            "output throughput at concurrency {c}",
            "tok/s",
            "higher",
            "sum of usage.completion_tokens / run duration (vLLM output_throughput; duration = "
            "dispatch start to last request done)",
        ),
        _spec(
            "total_throughput_c{c}",
            "total token throughput at concurrency {c}",
            "tok/s",
            "higher",
            "sum of (usage.prompt_tokens + usage.completion_tokens) / run duration (vLLM "
            "total_token_throughput)",
        ),
        _spec(
            "median_tpot_ms_c{c}",
            "median time per output token at concurrency {c}",
            "ms",
            "lower",
            "median over requests of (E2EL - TTFT) / (N - 1) (vLLM TPOT)",
        ),
        _spec(
            "median_ttft_ms_c{c}",
            "median time to first token at concurrency {c}",
            "ms",
            "lower",
            "median over requests of first chunk with non-empty choices - send (vLLM TTFT)",
        ),
        _spec(
            "wall_aggregate_tok_s_c{c}",
            "wall aggregate output rate at concurrency {c}",
            "tok/s",
            "higher",
            "sum of completion tokens / (max end - min send) (b70 lab)",
        ),
        _spec(
            "session_cold_ttft_s",
            "session-cache cold TTFT (prefix not cached)",
            "s",
            "lower",
            "median over sessions of first non-empty text - send, pass 1",
        ),
        _spec(
            "session_reload_ttft_s",
            "session-cache reload TTFT (prefix cached)",
            "s",
            "lower",
            "median over sessions of first non-empty text - send, reload passes",
        ),
        _spec(
            "session_reload_speedup",
            "session-cache reload TTFT speed-up",
            "x",
            "higher",
            "cold TTFT / reload TTFT",
        ),
        _spec(
            "session_reload_wall_tok_s",
            "session-cache sustained decode, reload pass",
            "tok/s",
            "higher",
            "generated tokens / elapsed of the slowest request (the lab's wall tok/s)",
        ),
        _spec(
            "session_reload_first_to_last_tok_s",
            "session-cache decode, first token to last finish, reload pass",
            "tok/s",
            "higher",
            "generated tokens / (last finish - first streamed text)",
        ),
    )
}


def spec(name: str) -> MetricSpec:
    """The catalogue entry of a name template (`"output_throughput_c{c}"`)."""
    return CATALOGUE[name]


def family_of(fig: Figure) -> str:
    """The metric without the shape suffix its name carries (`_c4` for concurrency 4,
    `_p128` for a 128-token prompt); a suffix that is not the figure's own shape stays."""
    name = fig.metric
    for prefix, value in (("c", fig.shape.concurrency), ("p", fig.shape.prompt_tokens)):
        suffix = f"_{prefix}{value}"
        if value is not None and name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


# Issue 16 item 4: card count as a variable (servelab.cards). Derived at the end of the
# session from the card variants' output_throughput_c{c}; `{n}` is the variant's card count
# (also in its profile name, `NAME@2cards`). docs/cards.md says how runs are paired.
CATALOGUE.update(
    (s.name, s)
    for s in (
        _spec(
            "output_tok_s_per_card_c{c}",
            "output throughput per card at concurrency {c}, {n}-card variant",
            "tok/s/card",
            "higher",
            "output_throughput_c{c} of the N-card variant / N, per run",
        ),
        _spec(
            "scaling_efficiency_c{c}",
            "scaling efficiency at concurrency {c}, {n} cards vs 1",
            "ratio",
            "higher",
            "output_throughput_c{c} at N cards / (N x the median over runs of "
            "output_throughput_c{c} at 1 card), per run of the N-card variant; 1 = linear",
        ),
    )
)


# Issue 17: open-loop rate sweeps, their knee, percentiles as figures, trace replay. A rate
# in a name is whole milli-requests per second (`_r500`: 0.5 req/s offered); the arrival
# process, seed, request counts and SLOs are in each figure's notes.
_LATENCY_WORDS = {
    "ttft": ("time to first token", "first chunk with non-empty choices - send (vLLM TTFT)"),
    "tpot": ("time per output token", "(E2EL - TTFT) / (N - 1) per request (vLLM TPOT)"),
    "itl": ("inter-token latency", "every gap between token chunks, pooled (vLLM ITL)"),
    "e2el": ("end-to-end latency", "last token chunk - send (vLLM E2EL)"),
}
_PERCENTILE_WORDS = {50: "p50", 90: "p90", 99: "p99", 999: "p99.9"}


def _percentile_specs(suffix: str, where: str) -> tuple[MetricSpec, ...]:
    return tuple(
        _spec(
            f"p{q}_{lat}_ms{suffix}",
            f"{pname} {words} {where}",
            "ms",
            "lower",
            f"{pname} (np.percentile, linear) over one run's requests of: {how}; the notes give "
            "the sample count and whether it certifies the percentile (servelab.certify)",
        )
        for lat, (words, how) in _LATENCY_WORDS.items()
        for q, pname in _PERCENTILE_WORDS.items()
    )


CATALOGUE.update(
    (s.name, s)
    for s in (
        _spec(
            "achieved_rps_r{r}",
            "achieved request rate at offered {r} mreq/s",
            "req/s",
            "higher",
            "completed requests / run duration (vLLM request_throughput), open loop",
        ),
        _spec(
            "output_throughput_r{r}",
            "output throughput at offered {r} mreq/s",
            "tok/s",
            "higher",
            "sum of usage.completion_tokens / run duration (vLLM output_throughput), open loop",
        ),
        _spec(
            "goodput_rps_r{r}",
            "request goodput at offered {r} mreq/s",
            "req/s",
            "higher",
            "requests meeting every SLO in the notes / run duration (vLLM --goodput; TPOT "
            "taken as 0 for one-token outputs)",
        ),
        _spec(
            "knee_rate_rps",
            "saturation knee: highest offered rate before the server saturates",
            "req/s",
            "higher",
            "last offered rate of a rising open-loop sweep before the first saturated one "
            "(failed requests, completions spread over > 1.25x the arrivals' span, or "
            "throughput gain < half the rate's gain while median E2EL rose > 1.5x; "
            "servelab.sweeps); NaN: saturated at the first rate",
        ),
        _spec(
            "capacity_rps",
            "capacity under SLOs: highest offered rate holding every p99 SLO",
            "req/s",
            "higher",
            "highest open-loop offered rate whose per-run p99 of each SLO'd latency (TTFT, "
            "TPOT; bounds in the notes) is within its bound, found by bracketing then "
            "bisection (servelab.capacity.capacity_search); NaN: the first rate failed",
        ),
        _spec(
            "trace_achieved_rps",
            "achieved request rate, trace replay",
            "req/s",
            "higher",
            "completed requests / run duration, requests due at the trace's timestamps",
        ),
        _spec(
            "trace_output_throughput",
            "output throughput, trace replay",
            "tok/s",
            "higher",
            "sum of usage.completion_tokens / run duration, requests due at the trace's timestamps",
        ),
        *_percentile_specs("_r{r}", "at offered {r} mreq/s"),
        *_percentile_specs("_trace", "in trace replay"),
    )
)


# Issue 16 item 3: accelerator telemetry per measured run (servelab.telemetry). `{test}` is
# the perf test without `test_`, `{group}` its runs' group (`_c4`, `_p128`, `_r500`), and
# per-card figures carry `_card{card}`. Power is sampled (NVML nvmlDeviceGetPowerUsage,
# xpu-smi metric 1) every --telemetry-interval-ms; the notes name the source, the interval,
# each run's sample count and how its energy was found.
_WHOLE = "summed over the profile's cards"
_TELEMETRY: tuple[tuple[str, str, str, Direction, str], ...] = (
    (
        "gpu_mean_power_w",
        "mean accelerator power",
        "W",
        "lower",
        "time-weighted mean of sampled power over the run (trapezoid over the samples, "
        "interpolated at the run's start and end, / run duration)",
    ),
    (
        "gpu_peak_power_w",
        "peak accelerator power",
        "W",
        "lower",
        "largest sampled power from the last sample at or before the run's start to the "
        "first at or after its end",
    ),
    (
        "gpu_energy_j",
        "accelerator energy per run",
        "J",
        "lower",
        "the card's energy counter at the run's end - at its start (NVML total-energy "
        "counter, xpu-smi metric 8; linear between samples) where every sample has it, else "
        "the trapezoid integral of sampled power; the notes say which",
    ),
    (
        "gpu_peak_memory_gib",
        "peak accelerator memory used",
        "GiB",
        "lower",
        "largest sampled memory used (NVML nvmlDeviceGetMemoryInfo.used, xpu-smi metric "
        "18) over the same samples as peak power",
    ),
)
CATALOGUE.update(
    (s.name, s)
    for family, title, unit, direction, definition in _TELEMETRY
    for s in (
        _spec(
            f"{family}_{{test}}{{group}}",
            f"{title} ({_WHOLE}), {{test}}{{words}}",
            unit,
            direction,
            f"{definition}; {_WHOLE}",
        ),
        _spec(
            f"{family}_card{{card}}_{{test}}{{group}}",
            f"{title}, card {{card}}, {{test}}{{words}}",
            unit,
            direction,
            definition,
        ),
    )
)
CATALOGUE.update(
    (s.name, s)
    for s in (
        _spec(
            "gpu_output_tok_per_j_{test}{group}",
            f"output tokens per joule ({_WHOLE}), {{test}}{{words}}",
            "tok/J",
            "higher",
            "sum of usage.completion_tokens of the run's successful requests / the run's "
            f"accelerator energy ({_WHOLE}; gpu_energy_j)",
        ),
    )
)

# Issue 24 item 3 (H4): integrity-audit figures (servelab.audits, perf/test_audits.py). One
# value per request; each audit also gates its test.
CATALOGUE.update(
    (s.name, s)
    for s in (
        _spec(
            "audit_output_length_ratio",
            "output length / length asked, without ignore_eos (LoadGen TEST09)",
            "x asked",
            "higher",
            "usage.completion_tokens / max_tokens per request, the model free to stop at EOS; "
            "the audit gates on their mean within +/-10 % of 1 (servelab.audits.length_audit)",
        ),
        _spec(
            "audit_forced_length_ratio",
            "output length / length forced with ignore_eos",
            "x forced",
            "higher",
            "usage.completion_tokens / max_tokens per request with ignore_eos; the audit gates "
            "on every request exactly 1 (servelab.audits.forced_length_audit)",
        ),
    )
)


# Issue 17 items 5, 6, 7 (H5): multi-turn sessions by turn index (`_turn{t}`, 1-based; the
# control arm, a fresh salt heading every prompt, ends in `_control`), per session, trace
# replay with shared prefixes, and the surviving streams of a run with cancellations.
_MT = "median over the run's sessions of"
CATALOGUE.update(
    (s.name, s)
    for s in (
        _spec(
            "mt_ttft_ms_turn{t}",
            "time to first token at turn {t} of multi-turn sessions",
            "ms",
            "lower",
            f"{_MT} turn t's TTFT (first chunk with choices - send); turn t's prompt is the "
            "whole history (turns 1..t-1 and their answers) plus a new user message",
        ),
        _spec(
            "mt_ttft_ms_turn{t}_control",
            "time to first token at turn {t} of multi-turn sessions, no prefix to reuse",
            "ms",
            "lower",
            f"{_MT} turn t's TTFT when a fresh salt heads every turn's prompt (the same "
            "lengths with nothing cached): the control arm of mt_ttft_ms_turn{t}",
        ),
        _spec(
            "mt_cached_share_turn{t}",
            "share of turn {t}'s prompt tokens served from the prefix cache",
            "ratio",
            "higher",
            f"{_MT} usage.prompt_tokens_details.cached_tokens / usage.prompt_tokens at turn t",
        ),
        _spec(
            "mt_session_s",
            "multi-turn session duration",
            "s",
            "lower",
            f"{_MT} last token chunk of its last turn - send of its first, think delays included",
        ),
        _spec(
            "mt_output_throughput",
            "output throughput of multi-turn sessions",
            "tok/s",
            "higher",
            "sum of usage.completion_tokens over every turn of every session / run duration",
        ),
        _spec(
            "trace_cached_share",
            "share of prompt tokens served from the prefix cache, trace replay",
            "ratio",
            "higher",
            "sum of usage.prompt_tokens_details.cached_tokens / sum of usage.prompt_tokens over "
            "the run's requests, prompts sharing the trace's hash-id blocks (the notes give "
            "the share a cache of the trace's block size could serve)",
        ),
        _spec(
            "cancel_survivor_output_throughput",
            "output throughput of the surviving streams, with cancellations",
            "tok/s",
            "higher",
            "sum of usage.completion_tokens of the streams not cancelled / run duration",
        ),
        _spec(
            "cancel_release_ms",
            "time for the engine to release cancelled requests",
            "ms",
            "lower",
            "from the run's end to the first /metrics scrape (every 50 ms) with no request "
            "running or waiting and KV cache usage back to its level before the run",
        ),
        *_percentile_specs("_cancel", "of surviving streams, with cancellations"),
    )
)
