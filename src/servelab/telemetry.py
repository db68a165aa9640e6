"""(Over 400 lines: one concept, a run's telemetry: plan, sampler, figures; readers apart.)
Accelerator telemetry for every measured run (issue 16 item 3): which source and cards a
profile has, a sampler on its own daemon thread around a perf test, and each run's labeled
figures: mean and peak power, energy, output tokens per joule, peak memory, per card and
summed over cards.

Readings come from `servelab.telemetry_sources` (NVML, `xpu-smi dump`), stamped with the
client's `perf_counter_ns`, so a run's `start_ns`/`end_ns` slice them. The sampler only
appends readings; everything here that computes is a pure function of them. Nothing read
becomes 0: a profile without an accelerator, a missing tool, a refusal or a lost card is a
labeled "not measured" or "incomplete", and its figures are None.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from servelab.figures import Shape
from servelab.telemetry_sources import (
    NvmlSource,
    Reading,
    Source,
    TelemetryUnavailable,
    Tick,
    XpuSmiSource,
)

if TYPE_CHECKING:
    from servelab.loadgen import RunResult

Mode = Literal["auto", "off", "nvml", "xpu-smi"]
MODES: tuple[Mode, ...] = ("auto", "off", "nvml", "xpu-smi")
DEFAULT_INTERVAL_MS = 100.0
MAX_POINTS = 200  # per run, in the stored series
MEASURED = "measured"

# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Which source reads which cards, or why nothing is measured."""

    source: Literal["nvml", "xpu-smi"] | None
    cards: tuple[str, ...] = ()  # () = every card the source sees
    reason: str | None = None  # "not measured: ..." when source is None


def visible_cards(accelerator: str, count: int, env: Mapping[str, str]) -> tuple[str, ...]:
    """The cards the engine is given: CUDA_VISIBLE_DEVICES (cuda) or ZE_AFFINITY_MASK (xpu;
    `1.0` tile forms count their device once) from the profile's engine env, else the first
    `count`, else () (every card)."""
    var = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}.get(accelerator)
    mask = env.get(var, "").strip() if var else ""
    if mask:
        cards: list[str] = []
        for item in (x.strip() for x in mask.split(",")):
            card = item.split(".")[0] if accelerator == "xpu" else item
            if card and card not in cards:
                cards.append(card)
        return tuple(cards)
    return tuple(str(i) for i in range(count))


def plan(mode: Mode, accelerator: str, count: int, env: Mapping[str, str]) -> Plan:
    if mode == "off":
        return Plan(None, reason="not measured: telemetry off (--telemetry off)")
    if mode == "auto" and accelerator not in ("cuda", "xpu"):
        return Plan(None, reason="not measured: no accelerator")
    source: Literal["nvml", "xpu-smi"]
    source = ("nvml" if accelerator == "cuda" else "xpu-smi") if mode == "auto" else mode
    kind = {"nvml": "cuda", "xpu-smi": "xpu"}[source]
    return Plan(source, visible_cards(kind, count, env))


def make_source(p: Plan, interval_ms: float) -> Source | None:
    if p.source == "nvml":
        return NvmlSource(p.cards)
    if p.source == "xpu-smi":
        src = XpuSmiSource(p.cards)
        src.interval(interval_ms / 1000)
        return src
    return None


# --------------------------------------------------------------------------- sampler


class Sampler:
    """Reads `source` every `interval_ms` on its own daemon thread while entered. Entering
    waits for the first tick (the bracket before the first run); `stop(until_ns)` waits, up
    to three intervals, for a tick at or after `until_ns` (the bracket after the last run).
    Without a source (or when it cannot open) it costs nothing and `reason` says why."""

    def __init__(
        self, source: Source | None, interval_ms: float = DEFAULT_INTERVAL_MS, reason: str = ""
    ) -> None:
        self.source = source
        self.interval_ms = interval_ms
        self.reason: str | None = reason or (None if source else "not measured: no source")
        self.ticks: list[Tick] = []
        self.lost: dict[str, tuple[int, str]] = {}  # card: (t_ns, why)
        self._stop = threading.Event()
        self._new = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.source.name if self.source is not None else "none"

    def __enter__(self) -> Sampler:
        if self.source is None or self.reason is not None:
            return self
        try:
            self.source.open()
        except TelemetryUnavailable as exc:
            self.reason = f"not measured: {exc}"
            return self
        except Exception as exc:  # a reader's own fault is "not measured", never a crash
            self.reason = f"not measured: {self.source.name} failed to open ({exc!r})"
            return self
        self._thread = threading.Thread(target=self._run, name="servelab-telemetry", daemon=True)
        self._thread.start()
        self._wait(lambda: bool(self.ticks) or not self._alive(), 5.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wait(self, done: Any, timeout_s: float) -> None:
        with self._new:
            self._new.wait_for(done, timeout_s)

    def _run(self) -> None:
        assert self.source is not None
        try:
            for tick in self.source.ticks(self.interval_ms / 1000, self._stop):
                for card, why in tick.lost:
                    self.lost.setdefault(card, (time.perf_counter_ns(), why))
                with self._new:
                    self.ticks.append(tick)
                    self._new.notify_all()
        except TelemetryUnavailable as exc:
            if not self.ticks:
                self.reason = f"not measured: {exc}"
        except Exception as exc:  # a reader fault is the runs' "incomplete", never a crash
            t = time.perf_counter_ns()
            cards = {r.card for tick in self.ticks for r in tick.readings}
            for card in cards:
                self.lost.setdefault(card, (t, f"telemetry stopped: {exc!r}"))
            if not self.ticks:
                self.reason = f"not measured: telemetry failed ({exc!r})"
        finally:
            with self._new:
                self._new.notify_all()

    def stop(self, until_ns: int | None = None) -> None:
        if self._thread is None:
            return
        if until_ns is not None:
            limit = 3 * self.interval_ms / 1000 + 1.0
            self._wait(
                lambda: (
                    not self._alive()
                    or any(r.t_ns >= until_ns for t in self.ticks[-1:] for r in t.readings)
                ),
                limit,
            )
        self._stop.set()
        assert self.source is not None
        self.source.interrupt()
        self._thread.join(10)
        self._thread = None
        self.source.close()


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class CardRun:
    """One card over one run."""

    card: str
    mean_power_w: float | None
    peak_power_w: float | None
    energy_j: float | None
    energy_method: str | None  # "counter" | "integral"
    peak_memory_gib: float | None
    samples: int
    status: str = MEASURED


@dataclass(frozen=True)
class RunTelemetry:
    """One run's telemetry: its status, per-card and summed figures, and a small series."""

    status: str  # "measured" | "not measured: ..." | "incomplete: card N lost at t=..."
    source: str
    interval_ms: float
    cards: tuple[CardRun, ...] = ()
    mean_power_w: float | None = None
    peak_power_w: float | None = None
    energy_j: float | None = None
    energy_method: str | None = None
    output_tokens: int | None = None
    output_tok_per_j: float | None = None
    peak_memory_gib: float | None = None
    series: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _interp(points: Sequence[tuple[int, float]], t: int) -> float | None:
    """Linear between the samples around t; None when t is outside them."""
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    if points and points[0][0] == t:
        return points[0][1]
    return None


def _integral_j(points: Sequence[tuple[int, float]], start: int, end: int) -> float | None:
    a, b = _interp(points, start), _interp(points, end)
    if a is None or b is None:
        return None
    inside = [(t, v) for t, v in points if start < t < end]
    path = [(start, a), *inside, (end, b)]
    return sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(path)) / 1e9


def _window(readings: Sequence[Reading], start: int, end: int) -> list[Reading]:
    """The samples from the last at or before `start` to the first at or after `end`."""
    before = [i for i, r in enumerate(readings) if r.t_ns <= start]
    after = [i for i, r in enumerate(readings) if r.t_ns >= end]
    lo = before[-1] if before else 0
    hi = after[0] if after else len(readings) - 1
    return list(readings[lo : hi + 1])


def _max(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return max(finite) if finite else None


def card_run(card: str, readings: Sequence[Reading], start: int, end: int) -> CardRun:
    power = [(r.t_ns, r.power_w) for r in readings if r.power_w is not None]
    counter = [(r.t_ns, r.energy_j) for r in readings if r.energy_j is not None]
    window = _window(readings, start, end)
    integral = _integral_j(power, start, end)
    energy, method = integral, "integral" if integral is not None else None
    c0, c1 = _interp(counter, start), _interp(counter, end)
    monotonic = all(b[1] >= a[1] for a, b in itertools.pairwise(counter))
    if c0 is not None and c1 is not None and monotonic:
        energy, method = c1 - c0, "counter"
    duration_s = (end - start) / 1e9
    return CardRun(
        card=card,
        mean_power_w=None if integral is None or duration_s <= 0 else integral / duration_s,
        peak_power_w=_max([r.power_w for r in window]),
        energy_j=energy,
        energy_method=method,
        peak_memory_gib=_max([r.memory_used_gib for r in window]),
        samples=sum(start <= r.t_ns <= end for r in readings),
    )


def _series(ticks: Sequence[Tick], start: int, end: int, cards: Sequence[str]) -> dict[str, Any]:
    """Power and memory summed over cards against seconds from the run's start, averaged
    (power) or maxed (memory) into at most MAX_POINTS buckets; a tick missing a card adds
    no point."""
    rows: list[tuple[float, float | None, float | None]] = []
    for tick in ticks:
        by = {r.card: r for r in tick.readings}
        if not tick.readings or not all(c in by for c in cards):
            continue
        t = tick.readings[0].t_ns
        if not start <= t <= end:
            continue
        p = [by[c].power_w for c in cards]
        m = [by[c].memory_used_gib for c in cards]
        rows.append(
            (
                (t - start) / 1e9,
                None if None in p else sum(v for v in p if v is not None),
                None if None in m else sum(v for v in m if v is not None),
            )
        )
    size = max(1, math.ceil(len(rows) / MAX_POINTS))
    out: dict[str, list[float | None]] = {"t_s": [], "power_w": [], "memory_gib": []}
    for i in range(0, len(rows), size):
        bucket = rows[i : i + size]
        ps = [p for _, p, _ in bucket if p is not None]
        out["t_s"].append(round(sum(t for t, _, _ in bucket) / len(bucket), 4))
        out["power_w"].append(round(sum(ps) / len(ps), 3) if ps else None)
        out["memory_gib"].append(_max([m for _, _, m in bucket]))
    return out


def output_tokens(run: RunResult) -> int | None:
    """Output tokens of the run's successful requests (usage.completion_tokens); None when
    one of them did not report its count."""
    counts = [r.completion_tokens for r in run.records if r.success]
    if any(c is None for c in counts):
        return None
    return sum(c for c in counts if c is not None)


def summarize(
    sampler: Sampler, start_ns: int, end_ns: int, tokens: int | None, interval_ms: float
) -> RunTelemetry:
    """One run's telemetry from what the sampler read."""
    if sampler.reason is not None:
        return RunTelemetry(sampler.reason, sampler.name, interval_ms)
    by_card: dict[str, list[Reading]] = {}
    for tick in sampler.ticks:
        for r in tick.readings:
            by_card.setdefault(r.card, []).append(r)
    cards = sorted(by_card, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    runs: list[CardRun] = []
    problems: list[str] = []
    for card in cards:
        readings = by_card[card]
        cr = card_run(card, readings, start_ns, end_ns)
        lost = sampler.lost.get(card)
        if lost is not None and not any(r.t_ns >= end_ns for r in readings):
            at = (lost[0] - start_ns) / 1e9
            status = f"incomplete: card {card} lost at t={at:.2f} s ({lost[1]})"
            problems.append(status)
            cr = CardRun(card, None, None, None, None, None, cr.samples, status)
        elif cr.energy_j is None:
            status = f"incomplete: card {card} has no sample before or after the run"
            problems.append(status)
            cr = CardRun(card, None, None, None, None, None, cr.samples, status)
        runs.append(cr)
    if not runs:
        return RunTelemetry("not measured: no reading", sampler.name, interval_ms)
    series = _series(sampler.ticks, start_ns, end_ns, cards)
    if problems:
        status = "; ".join(problems)
        return RunTelemetry(status, sampler.name, interval_ms, tuple(runs), series=series)
    methods = sorted({c.energy_method for c in runs if c.energy_method})
    energy = sum(c.energy_j for c in runs if c.energy_j is not None)
    mean = [c.mean_power_w for c in runs]
    memory = [c.peak_memory_gib for c in runs]
    return RunTelemetry(
        MEASURED,
        sampler.name,
        interval_ms,
        tuple(runs),
        mean_power_w=None if None in mean else sum(v for v in mean if v is not None),
        peak_power_w=_peak_sum(sampler.ticks, start_ns, end_ns, cards),
        energy_j=energy,
        energy_method="+".join(methods),
        output_tokens=tokens,
        output_tok_per_j=None if tokens is None or energy <= 0 else tokens / energy,
        peak_memory_gib=_peak_sum(sampler.ticks, start_ns, end_ns, cards, memory=True)
        if None not in memory
        else None,
        series=series,
    )


def _peak_sum(
    ticks: Sequence[Tick], start: int, end: int, cards: Sequence[str], *, memory: bool = False
) -> float | None:
    """Max over the run's window of ticks (as `_window`) of the value summed over cards."""
    sums: list[tuple[int, float]] = []
    for tick in ticks:
        by = {r.card: r.memory_used_gib if memory else r.power_w for r in tick.readings}
        values = [by.get(c) for c in cards]
        if tick.readings and None not in values:
            sums.append((tick.readings[0].t_ns, sum(v for v in values if v is not None)))
    before = [i for i, (t, _) in enumerate(sums) if t <= start]
    after = [i for i, (t, _) in enumerate(sums) if t >= end]
    lo = before[-1] if before else 0
    hi = after[0] if after else len(sums) - 1
    inside = [v for _, v in sums[lo : hi + 1]]
    return max(inside) if inside else None


# --------------------------------------------------------------------------- figures

#: (catalogue family, RunTelemetry / CardRun attribute); per card where marked.
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("gpu_mean_power_w", "mean_power_w", True),
    ("gpu_peak_power_w", "peak_power_w", True),
    ("gpu_energy_j", "energy_j", True),
    ("gpu_output_tok_per_j", "output_tok_per_j", False),
    ("gpu_peak_memory_gib", "peak_memory_gib", True),
)


def group_of(labels: Mapping[str, Any]) -> tuple[str, str]:
    """A run's group (its labels but `run` and `again`) as a metric-name suffix and words:
    `{"concurrency": 4}` is `_c4`, `{"prompt_length": 128}` `_p128`, `{"rate_rps": 0.5}`
    `_r500` (milli-requests per second, as the rate figures)."""
    suffix, words = "", ""
    for key in sorted(k for k in labels if k not in ("run", "again")):
        value = labels[key]
        if key == "concurrency":
            suffix, words = suffix + f"_c{value}", words + f" at concurrency {value}"
        elif key == "prompt_length":
            suffix, words = suffix + f"_p{value}", words + f", {value}-token prompt"
        elif key == "rate_rps":
            milli = round(float(value) * 1000)
            suffix, words = suffix + f"_r{milli}", words + f" at offered {milli} mreq/s"
        else:
            clean = re.sub(r"[^a-z0-9]+", "_", f"{key}_{value}".lower()).strip("_")
            suffix, words = suffix + f"_{clean}", words + f", {key} {value}"
    return suffix, words


def describe(t: RunTelemetry) -> str:
    """One line for a figure's notes."""
    if t.status != MEASURED:
        return t.status
    parts = [f"{c.card}: {c.samples} samples, energy by {c.energy_method}" for c in t.cards]
    return f"{t.source} every {t.interval_ms:g} ms; " + "; ".join(parts)


def run_shape(run: RunResult) -> Shape:
    """A run's shape from its requests: the prompt and output lengths asked where all asked
    the same, the client's cap as concurrency (an open loop's: its request count)."""
    prompts = {r.requested_prompt_tokens for r in run.records}
    outputs = {r.requested_output_tokens for r in run.records}
    return Shape(
        prompts.pop() if len(prompts) == 1 else None,
        outputs.pop() if len(outputs) == 1 else None,
        concurrency=run.concurrency or len(run.records),
    )


@dataclass(frozen=True)
class PlannedFigure:
    """A telemetry figure to record: its catalogue template, axis, one value per run."""

    template: str
    axis: Mapping[str, Any]  # str values: test, group, words, card
    values: tuple[float | None, ...]
    shape: Shape
    notes: tuple[str, ...]

    @property
    def metric(self) -> str:
        return self.template.format(**self.axis)


Summarized = tuple[Mapping[str, Any], "RunResult", RunTelemetry]


def planned_figures(test: str, runs: Sequence[Summarized]) -> list[PlannedFigure]:
    """Per group of runs (their labels but `run` and `again`): each family summed over the
    cards, and per card where there are several; nothing for a group none of whose runs was
    measured (its entry in the record says why)."""
    groups: dict[str, list[Summarized]] = {}
    for run in runs:
        groups.setdefault(group_of(run[0])[0], []).append(run)
    name = test.removeprefix("test_")
    out: list[PlannedFigure] = []
    for members in groups.values():
        ts = [t for _, _, t in members]
        if all(t.status.startswith("not measured") for t in ts):
            continue
        suffix, words = group_of(members[0][0])
        axis = {"test": name, "group": suffix, "words": words}
        shape = run_shape(members[0][1])
        notes = tuple(f"run {i + 1}: {describe(t)}" for i, t in enumerate(ts))
        cards = sorted({c.card for t in ts for c in t.cards})
        for family, attr, per_card in FIGURES:
            values = tuple(getattr(t, attr) for t in ts)
            out.append(PlannedFigure(f"{family}_{{test}}{{group}}", axis, values, shape, notes))
            if not per_card or len(cards) < 2:
                continue
            for card in cards:
                values = tuple(
                    next((getattr(c, attr) for c in t.cards if c.card == card), None) for t in ts
                )
                out.append(
                    PlannedFigure(
                        f"{family}_card{{card}}_{{test}}{{group}}",
                        {**axis, "card": card},
                        values,
                        shape,
                        notes,
                    )
                )
    return out


def entry(sampler: Sampler, runs: Sequence[Summarized]) -> dict[str, Any]:
    """A test's telemetry as the record keeps it (by pytest node id)."""
    return {
        "source": sampler.name,
        "interval_ms": sampler.interval_ms,
        "status": sampler.reason or MEASURED,
        "lost": {card: {"why": why} for card, (_, why) in sampler.lost.items()},
        "runs": [
            {"labels": {k: v for k, v in labels.items()}, **t.to_dict()} for labels, _, t in runs
        ],
    }


def sampler_for(
    mode: Mode, interval_ms: float, accelerator: str | None, count: int, env: Mapping[str, str]
) -> Sampler:
    """The sampler of one perf test: for a profile's hardware, or (accelerator None: an
    external endpoint) only where the mode names a source."""
    if accelerator is None and mode == "auto":
        return Sampler(
            None, interval_ms, "not measured: external endpoint (pass --telemetry nvml|xpu-smi)"
        )
    p = plan(mode, accelerator or "cpu", count, env)
    source = make_source(p, interval_ms)
    return Sampler(source, interval_ms, p.reason or "")
