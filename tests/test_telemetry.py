"""Issue 16 item 3: accelerator telemetry per measured run.

There is no NVIDIA card and no Intel GPU on the machine these tests run on. NVML is an
honest stand-in: `FakeNvml` below is a module object with pynvml's names, injected where
`pynvml` would be imported, answering from a script (each card draws `watts(t)`, its
total-energy counter is the exact integral of that) and raising NVML's own error classes
for a refused permission, a missing energy counter and a lost card. xpu-smi is its
documented `dump` text, written by hand into tests/data/telemetry (see its README).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from servelab import telemetry
from servelab.catalogue import CATALOGUE, family_of
from servelab.client import RequestRecord
from servelab.figures import Figure, Identity
from servelab.loadgen import RunResult
from servelab.plugin_measure import Measurement
from servelab.plugin_options import Options
from servelab.server import Endpoint
from servelab.session import SessionResults
from servelab.telemetry import Sampler, summarize
from servelab.telemetry_sources import (
    DumpParser,
    NvmlSource,
    Reading,
    Tick,
    XpuSmiSource,
    dump_command,
)
from tests.fakes import scripted_server

DATA = Path(__file__).parent / "data" / "telemetry"
ROOT = Path(__file__).resolve().parents[1]
S = 1_000_000_000

# --------------------------------------------------------------------------- fake NVML


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class NotSupported(NVMLError):  # pynvml's NVMLError_NotSupported
    def __init__(self) -> None:
        super().__init__(3)


class NoPermission(NVMLError):  # NVMLError_NoPermission
    def __init__(self) -> None:
        super().__init__(4)


class LibraryNotFound(NVMLError):  # NVMLError_LibraryNotFound
    def __init__(self) -> None:
        super().__init__(12)


class GpuIsLost(NVMLError):  # NVMLError_GpuIsLost
    def __init__(self) -> None:
        super().__init__(15)


# pynvml's class names, which servelab reads the error's kind from.
for _cls in (NotSupported, NoPermission, LibraryNotFound, GpuIsLost):
    _cls.__name__ = f"NVMLError_{_cls.__name__}"


@dataclass
class FakeCard:
    watts: Callable[[float], float] = lambda t: 100.0
    memory_gib: float = 10.0
    energy_counter: bool = True
    lost_after_s: float | None = None  # GpuIsLost on every call after this
    no_permission: bool = False


@dataclass
class FakeNvml:
    cards: list[FakeCard] = field(default_factory=lambda: [FakeCard()])
    init_error: Callable[[], NVMLError] | None = None  # e.g. LibraryNotFound
    t0: float = 0.0
    calls: int = 0

    def t(self) -> float:
        return time.perf_counter() - self.t0

    def init(self) -> None:
        if self.init_error is not None:
            raise self.init_error()
        self.t0 = time.perf_counter()

    def card(self, handle: int) -> FakeCard:
        self.calls += 1
        card = self.cards[handle]
        if card.no_permission:
            raise NoPermission()
        if card.lost_after_s is not None and self.t() > card.lost_after_s:
            raise GpuIsLost()
        return card

    def power_mw(self, handle: int) -> int:
        return round(self.card(handle).watts(self.t()) * 1000)

    def energy_mj(self, handle: int) -> int:
        card = self.card(handle)
        if not card.energy_counter:
            raise NotSupported()
        t, n = self.t(), 100
        h = t / n  # Simpson: exact for the piecewise-quadratic watts used here
        total = sum(
            (card.watts(i * h) + 4 * card.watts((i + 0.5) * h) + card.watts((i + 1) * h)) * h / 6
            for i in range(n)
        )
        return round(5_000_000 + total * 1000)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        names: dict[str, Any] = {
            "NVMLError": NVMLError,
            "NVMLError_NotSupported": NotSupported,
            "NVMLError_NoPermission": NoPermission,
            "NVMLError_GpuIsLost": GpuIsLost,
            "NVML_CLOCK_SM": 1,
            "NVML_CLOCK_MEM": 2,
            "NVML_TEMPERATURE_GPU": 0,
            "nvmlInit": self.init,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.cards),
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetHandleByUUID": lambda uuid: int(uuid.decode().rsplit("-", 1)[1]),
            "nvmlDeviceGetPowerUsage": self.power_mw,
            "nvmlDeviceGetTotalEnergyConsumption": self.energy_mj,
            "nvmlDeviceGetClockInfo": lambda h, kind: (self.card(h), 1980 if kind == 1 else 2619)[
                1
            ],
            "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(
                used=int(self.card(h).memory_gib * 1024**3)
            ),
            "nvmlDeviceGetTemperature": lambda h, kind: (self.card(h), 45)[1],
            "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(
                gpu=(self.card(h), 97)[1], memory=40
            ),
        }
        for name, value in names.items():
            setattr(mod, name, value)
        return mod


def nvml_sampler(fake: FakeNvml, cards: tuple[str, ...] = (), interval_ms: float = 10) -> Sampler:
    return Sampler(NvmlSource(cards, module=fake.module()), interval_ms)


# --------------------------------------------------------------------------- helpers


def record(i: int, t0: int, tokens: int | None = 8, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        index=i, api="completions", arrival_ns=t0, send_ns=t0, first_token_ns=t0 + 1,
        first_text_ns=t0 + 1, end_ns=t0 + 2, done_ns=t0 + 3, chunk_ns=(t0 + 1, t0 + 2),
        chunk_tokens=(1, 1), text="x", finish_reason="length", prompt_tokens=16,
        completion_tokens=tokens, cached_tokens=None, requested_prompt_tokens=16,
        requested_output_tokens=8, status_code=200 if error is None else 500, error=error,
    )  # fmt: skip


def run_result(start: int, end: int, n: int = 4, concurrency: int | None = 2) -> RunResult:
    return RunResult(
        tuple(record(i, start) for i in range(n)), start, end, concurrency, 1, (), 50.0
    )


def filled(ticks: list[Tick], lost: dict[str, tuple[int, str]] | None = None) -> Sampler:
    """A sampler that has already read `ticks` (the summaries are pure functions of them)."""
    s = Sampler(None, 100.0, "")
    s.reason = None
    s.ticks = ticks
    s.lost = lost or {}
    return s


def steady(cards: dict[str, float], seconds: int, energy: bool = True) -> list[Tick]:
    """One tick a second from t=0 to `seconds`, each card at constant watts; counters in J."""
    return [
        Tick(
            tuple(
                Reading(
                    c,
                    t * S,
                    power_w=w,
                    energy_j=1000 + w * t if energy else None,
                    memory_used_gib=5.0 + t,
                )
                for c, w in cards.items()
            )
        )
        for t in range(seconds + 1)
    ]


# --------------------------------------------------------------------------- plan


def test_cpu_profiles_are_not_measured_and_cost_nothing() -> None:
    p = telemetry.plan("auto", "cpu", 0, {})
    assert p.source is None and p.reason == "not measured: no accelerator"
    s = telemetry.sampler_for("auto", 100.0, "cpu", 0, {})
    with s:
        assert s.source is None and s._thread is None  # no thread, no reader
    assert summarize(s, 0, S, 10, 100.0).status == "not measured: no accelerator"
    assert telemetry.sampler_for("off", 100.0, "cuda", 1, {}).reason == (
        "not measured: telemetry off (--telemetry off)"
    )
    assert "external endpoint" in str(telemetry.sampler_for("auto", 100.0, None, 0, {}).reason)


def test_cards_come_from_the_engine_env_then_the_count() -> None:
    assert telemetry.plan("auto", "cuda", 2, {}).cards == ("0", "1")
    env = {"CUDA_VISIBLE_DEVICES": "2, GPU-abc-1"}
    assert telemetry.plan("auto", "cuda", 4, env) == telemetry.Plan("nvml", ("2", "GPU-abc-1"))
    xpu = telemetry.plan("auto", "xpu", 4, {"ZE_AFFINITY_MASK": "0.0,0.1,3"})
    assert xpu == telemetry.Plan("xpu-smi", ("0", "3"))
    assert telemetry.plan("nvml", "cpu", 0, {}).cards == ()  # explicit: every card


# --------------------------------------------------------------------------- figures of a run


def test_energy_by_counter_and_by_integral_agree_on_steady_power() -> None:
    run = summarize(
        filled(steady({"0": 100.0, "1": 50.0}, 4)), int(0.5 * S), int(2.5 * S), 600, 100
    )
    assert run.status == "measured"
    assert [c.energy_method for c in run.cards] == ["counter", "counter"]
    assert run.energy_j == pytest.approx(300.0)  # (100 + 50) W x 2 s
    assert run.mean_power_w == pytest.approx(150.0)
    assert run.peak_power_w == pytest.approx(150.0)
    assert run.output_tok_per_j == pytest.approx(2.0)
    assert run.peak_memory_gib == pytest.approx(2 * (5.0 + 3))  # up to the sample after the end
    no_counter = summarize(
        filled(steady({"0": 100.0}, 4, energy=False)), S // 2, 5 * S // 2, 1, 100
    )
    assert no_counter.energy_method == "integral" and no_counter.energy_j == pytest.approx(200.0)


def test_the_integral_interpolates_at_the_run_bounds() -> None:
    ramp = [Tick((Reading("0", t * S, power_w=100.0 * t),)) for t in range(4)]  # 0,100,200,300 W
    run = summarize(filled(ramp), int(0.5 * S), int(2.5 * S), None, 100)
    assert run.energy_j == pytest.approx(300.0)  # mean of the ramp (150 W) x 2 s
    assert run.energy_method == "integral" and run.output_tok_per_j is None  # tokens unknown
    assert run.peak_power_w == pytest.approx(300.0)


def test_a_counter_that_goes_backwards_is_not_used() -> None:
    ticks = steady({"0": 100.0}, 4)
    ticks[2] = Tick((Reading("0", 2 * S, power_w=100.0, energy_j=3.0),))  # reset or garbage
    run = summarize(filled(ticks), S // 2, 5 * S // 2, 1, 100)
    assert run.energy_method == "integral" and run.energy_j == pytest.approx(200.0)


def test_a_card_lost_mid_run_makes_the_run_incomplete_never_zero() -> None:
    ticks = steady({"0": 100.0, "1": 100.0}, 4)
    ticks = [Tick(tuple(r for r in t.readings if r.card == "0" or r.t_ns < 2 * S)) for t in ticks]
    run = summarize(filled(ticks, {"1": (int(1.6 * S), "NVML GpuIsLost")}), S, 3 * S, 8, 100)
    assert run.status == "incomplete: card 1 lost at t=0.60 s (NVML GpuIsLost)"
    assert run.energy_j is None and run.output_tok_per_j is None and run.mean_power_w is None
    lost = next(c for c in run.cards if c.card == "1")
    assert lost.energy_j is None and lost.status.startswith("incomplete")
    kept = next(c for c in run.cards if c.card == "0")
    assert kept.energy_j == pytest.approx(200.0)
    # A run that ended before the loss (card 1 read after its end) is measured.
    early = summarize(filled(ticks, {"1": (int(1.6 * S), "NVML GpuIsLost")}), 0, S, 8, 100)
    assert early.status == "measured" and early.energy_j == pytest.approx(200.0)


def test_a_run_without_a_sample_after_its_end_is_incomplete() -> None:
    run = summarize(filled(steady({"0": 100.0}, 2)), S // 2, 5 * S, 8, 100)
    assert run.status.startswith("incomplete: card 0 has no sample") and run.energy_j is None


def test_the_stored_series_is_small() -> None:
    ticks = [Tick((Reading("0", t * S // 100, power_w=float(t % 7), memory_used_gib=1.0),))
             for t in range(5001)]  # fmt: skip
    run = summarize(filled(ticks), 0, 50 * S, 8, 10)
    assert 0 < len(run.series["t_s"]) <= telemetry.MAX_POINTS
    assert len(run.series["power_w"]) == len(run.series["t_s"]) == len(run.series["memory_gib"])
    assert run.series["memory_gib"][0] == 1.0


def test_output_tokens_count_successful_requests_and_missing_is_none() -> None:
    res = run_result(0, S)
    assert telemetry.output_tokens(res) == 32
    failed = RunResult((record(0, 0), record(1, 0, None, "HTTP 500")), 0, S, 1, 1, (), 50.0)
    assert telemetry.output_tokens(failed) == 8
    unknown = RunResult((record(0, 0, None),), 0, S, 1, 1, (), 50.0)
    assert telemetry.output_tokens(unknown) is None


def test_figures_per_group_per_card_and_in_the_catalogue() -> None:
    t = summarize(filled(steady({"0": 100.0, "1": 50.0}, 9)), S, 2 * S, 300, 100)
    runs = [({"run": i, "concurrency": c}, run_result(S, 2 * S, concurrency=c), t)
            for i in range(3) for c in (1, 4)]  # fmt: skip
    figs = telemetry.planned_figures("test_concurrency_sweep", runs)
    names = {f.metric for f in figs}
    assert "gpu_energy_j_concurrency_sweep_c4" in names
    assert "gpu_energy_j_card1_concurrency_sweep_c4" in names
    assert "gpu_output_tok_per_j_concurrency_sweep_c1" in names
    assert not any("tok_per_j_card" in n for n in names)  # tokens are not per card
    assert len(figs) == 2 * (5 + 4 * 2)
    energy = next(f for f in figs if f.metric == "gpu_energy_j_concurrency_sweep_c4")
    assert energy.values == (150.0, 150.0, 150.0) and energy.shape.concurrency == 4
    assert all(f.template in CATALOGUE for f in figs)
    fig = CATALOGUE[energy.template].figure(
        tuple(float(v or 0) for v in energy.values), shape=energy.shape,
        identity=Identity("gpu", "llama.cpp", "h", "m"), **energy.axis,
    )  # fmt: skip
    assert fig.unit == "J" and fig.direction == "lower"
    assert family_of(fig) == "gpu_energy_j_concurrency_sweep"  # one curve over concurrency
    assert "at concurrency 4" in fig.title
    rate = telemetry.group_of({"run": 0, "rate_rps": 0.5, "again": True})
    assert rate == ("_r500", " at offered 500 mreq/s")


def test_groups_none_of_whose_runs_was_measured_record_no_figure() -> None:
    gone = telemetry.RunTelemetry("not measured: x", "nvml", 100)
    assert telemetry.planned_figures("test_decode_c1", [({"run": 0}, run_result(0, S), gone)]) == []


# --------------------------------------------------------------------------- NVML


def test_nvml_sampler_reads_every_card_around_the_run() -> None:
    fake = FakeNvml(
        [FakeCard(lambda t: 120.0, 20.0), FakeCard(lambda t: 80.0, 10.0, energy_counter=False)]
    )
    with nvml_sampler(fake) as s:
        assert s.ticks, "entering waits for the first reading"
        start = time.perf_counter_ns()
        time.sleep(0.12)
        end = time.perf_counter_ns()
        s.stop(until_ns=end)
    run = summarize(s, start, end, 100, 10)
    assert run.status == "measured"
    assert [c.energy_method for c in run.cards] == ["counter", "integral"]
    assert run.energy_method == "counter+integral"
    assert run.energy_j == pytest.approx(200.0 * (end - start) / S, rel=0.05)
    assert run.mean_power_w == pytest.approx(200.0)
    assert run.peak_memory_gib == pytest.approx(30.0)
    r = s.ticks[0].readings[0]
    assert (r.sm_clock_mhz, r.memory_clock_mhz, r.temperature_c, r.utilization_pct) == (
        1980,
        2619,
        45,
        97,
    )
    assert not s._alive() and s.lost == {}  # stopping loses no card


def test_nvml_missing_library_is_not_measured() -> None:
    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("pynvml is installed here")
    with Sampler(NvmlSource(), 10) as s:
        pass
    assert s.reason is not None and s.reason.startswith("not measured: pynvml is not importable")
    fake = FakeNvml(init_error=LibraryNotFound)
    with nvml_sampler(fake) as s:
        pass
    assert s.reason == "not measured: NVML did not start: LibraryNotFound"


def test_nvml_permission_denied_is_not_measured() -> None:
    with nvml_sampler(FakeNvml([FakeCard(no_permission=True)])) as s:
        pass
    assert s.reason == "not measured: NVML refused card 0: NoPermission (permission denied)"
    assert summarize(s, 0, S, 1, 10).energy_j is None


def test_nvml_card_lost_mid_run() -> None:
    fake = FakeNvml([FakeCard(), FakeCard(lost_after_s=0.05)])
    with nvml_sampler(fake, ("0", "GPU-x-1")) as s:
        start = time.perf_counter_ns()
        time.sleep(0.15)
        end = time.perf_counter_ns()
        s.stop(until_ns=end)
    assert set(s.lost) == {"GPU-x-1"}
    run = summarize(s, start, end, 10, 10)
    assert run.status.startswith("incomplete: card GPU-x-1 lost at t=")
    assert "(NVML GpuIsLost)" in run.status
    assert run.energy_j is None and run.output_tok_per_j is None


# --------------------------------------------------------------------------- xpu-smi


def lines(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").splitlines(keepends=True)


def parser() -> DumpParser:
    """Rows placed by their own timestamps: 'now' is 10:42:20.000 at perf 100 s."""
    return DumpParser(clock=lambda: 100 * S, wall=lambda: 10 * 3600 + 42 * 60 + 20.0)


def dump_ticks(name: str, stopped: bool = True) -> list[Tick]:
    stop = threading.Event()
    if stopped:
        stop.set()
    return list(XpuSmiSource(lines=lines(name), parser=parser()).ticks(1.0, stop))


def test_xpu_smi_dump_parses_two_cards() -> None:
    ticks = dump_ticks("xpu_smi_dump_2cards.csv")
    assert len(ticks) == 8 and all(len(t.readings) == 2 for t in ticks)
    first = ticks[0].readings[0]
    assert first.memory_used_gib == pytest.approx(9216.31 / 1024)
    assert first == Reading(
        "0", 91 * S, power_w=38.52, energy_j=125034.21, sm_clock_mhz=600.0,
        memory_used_gib=first.memory_used_gib, temperature_c=41.0, utilization_pct=0.0,
    )  # fmt: skip
    s = filled(ticks)
    run = summarize(s, 93 * S, 97 * S, 4000, 1000)  # 10:42:13 to 10:42:17
    assert run.status == "measured" and run.energy_method == "counter"
    # The fixture's counter grows by the trapezoid of its power: both methods agree.
    integral = sum(c.mean_power_w or 0 for c in run.cards) * 4
    assert run.energy_j == pytest.approx(integral, rel=1e-3)
    assert run.peak_power_w == pytest.approx(
        168.02 + 170.33
    )  # the peak of the sum, not sum of peaks
    assert run.energy_j is not None and run.output_tok_per_j == pytest.approx(4000 / run.energy_j)


def test_xpu_smi_garbled_lines_are_skipped_and_na_is_none() -> None:
    p = parser()
    src = XpuSmiSource(lines=lines("xpu_smi_dump_garbled.csv"), parser=p)
    stop = threading.Event()
    stop.set()
    ticks = list(src.ticks(1.0, stop))
    readings = [r for t in ticks for r in t.readings]
    assert [(r.card, r.t_ns // S) for r in readings] == [("0", 91), ("1", 91), ("1", 92), ("1", 93)]
    na = readings[1]
    assert na.utilization_pct is None and na.energy_j is None and na.power_w == 36.90
    assert p.skipped == 4
    assert any("is not a number" in r for r in p.reasons)
    assert any("fields for 8 columns" in r for r in p.reasons)
    # Card 1 has no energy counter: its energy is the integral of its power.
    run = summarize(filled(ticks), int(91.5 * S), int(92.5 * S), 1, 1000)
    one = next(c for c in run.cards if c.card == "1")
    assert one.energy_method == "integral"


def test_xpu_smi_dump_that_stops_loses_its_cards() -> None:
    ticks = dump_ticks("xpu_smi_dump_stops.csv", stopped=False)
    assert ticks[-1].readings == () and {c for c, _ in ticks[-1].lost} == {"0", "1"}
    assert "xpu-smi dump stopped" in ticks[-1].lost[0][1]


def test_xpu_smi_rows_from_before_midnight_and_old_rows() -> None:
    late = DumpParser(clock=lambda: 100 * S, wall=lambda: 2.0)  # 00:00:02
    late.feed("Timestamp, DeviceId, GPU Power (W)\n")
    row = late.feed("23:59:59.000, 0, 10.0\n")
    assert row is not None and row[1].t_ns == 97 * S
    old = late.feed("12:00:00.000, 0, 10.0\n")
    assert old is not None and old[1].t_ns == 100 * S  # too old to trust: arrival time


def test_xpu_smi_live_command_missing_or_failing_is_not_measured(tmp_path: Path) -> None:
    with Sampler(XpuSmiSource(command=["servelab-no-such-xpu-smi", "dump"]), 1000) as s:
        pass
    assert (
        s.reason
        == "not measured: servelab-no-such-xpu-smi is not on PATH (install Intel XPU Manager)"
    )
    denied = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('Permission denied'); sys.exit(3)",
    ]
    with Sampler(XpuSmiSource(command=denied), 1000) as s:
        pass
    assert s.reason == "not measured: xpu-smi dump stopped (exit 3: Permission denied)"
    broken = tmp_path / "xpu-smi"  # executable, but its interpreter is missing: exec fails
    broken.write_text("#!/servelab/no/such/interpreter\n")
    broken.chmod(0o755)
    with Sampler(XpuSmiSource(command=[str(broken), "dump"]), 1000) as s:
        pass
    assert s.reason is not None and s.reason.startswith(f"not measured: {broken} could not start")
    assert dump_command(("0", "1"), 0.1)[-8:] == [
        "xpu-smi",
        "dump",
        "-d",
        "0,1",
        "-m",
        "0,1,2,3,8,18",
        "-i",
        "1",
    ]


def test_xpu_smi_live_process_group_is_killed_when_the_sampler_stops(tmp_path: Path) -> None:
    """A stand-in dump (this fixture's rows, one every 50 ms, forever, with a child of its
    own): stopping the sampler kills its whole process group."""
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        f"rows = open({str(DATA / 'xpu_smi_dump_2cards.csv')!r}).read().splitlines()\n"
        "print(rows[0], flush=True)\n"
        "while True:\n"
        "    for r in rows[1:]:\n"
        "        print(time.strftime('%H:%M:%S.000') + r[12:], flush=True)\n"
        "        time.sleep(0.05)\n"
    )
    with Sampler(XpuSmiSource(("1",), command=[sys.executable, "-c", script]), 1000) as s:
        time.sleep(0.3)
    assert s.reason is None and len(s.ticks) >= 2
    assert {r.card for t in s.ticks for r in t.readings} == {"1"}
    for pid in map(int, pids.read_text().split()):
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if _is_zombie(pid):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"process {pid} outlived the sampler")


def test_xpu_smi_live_dump_that_dies_mid_run_makes_the_run_incomplete() -> None:
    script = (
        "import sys, time\n"
        "print('Timestamp, DeviceId, GPU Power (W), GPU Energy Consumed (J)', flush=True)\n"
        "for i in range(3):\n"
        "    print(time.strftime('%H:%M:%S.000') + f', 0, 100.0, {1000 + 5 * i}', flush=True)\n"
        "    time.sleep(0.05)\n"
        "sys.stderr.write('device 0 lost')\n"
        "sys.exit(1)\n"
    )
    with Sampler(XpuSmiSource(command=[sys.executable, "-c", script]), 1000) as s:
        start = time.perf_counter_ns()
        time.sleep(0.4)
        end = time.perf_counter_ns()
        s.stop(until_ns=end)
    assert s.reason is None and set(s.lost) == {"0"}
    assert s.lost["0"][1] == "xpu-smi dump stopped (exit 1: device 0 lost)"
    run = summarize(s, start, end, 10, 1000)
    assert run.status.startswith("incomplete: card 0 lost at t=")
    assert run.energy_j is None and run.output_tok_per_j is None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------- Measurement


def _options() -> Options:
    return Options(
        profiles=(), endpoint="http://x", model="m", api_key=None, results_dir=Path("r"),
        baselines_dir=Path("b"), update_baselines=False, runs=None, startup_timeout_s=None,
    )  # fmt: skip


def measurement(sampler: Sampler | None) -> tuple[Measurement, SessionResults, list[Figure]]:
    results = SessionResults()
    recorded: list[Figure] = []

    def keep(f: Figure) -> Figure:
        recorded.append(f)
        return f

    m = Measurement(
        test="test_decode_c1", endpoint=Endpoint("http://x", "m"), profile=None,
        identity=Identity("gpu", "llama.cpp", "h", "m"), options=_options(), results=results,
        record=keep, report=lambda line: None, telemetry=sampler,
    )  # fmt: skip
    return m, results, recorded


def test_measurement_records_each_kept_runs_telemetry() -> None:
    fake = FakeNvml([FakeCard(lambda t: 150.0, 12.0)])
    m, results, figs = measurement(nvml_sampler(fake).__enter__())
    runs = []
    for i in range(3):
        start = time.perf_counter_ns()
        time.sleep(0.03)
        runs.append(({"run": i}, run_result(start, time.perf_counter_ns())))
    kept = m.keep(runs)
    m.keep(kept)  # the same runs again (a remeasure's inner keep) count once
    m.finish_telemetry("perf/test_decode.py::test_decode_c1[gpu]")
    entry = results.telemetry["perf/test_decode.py::test_decode_c1[gpu]"]
    assert entry["status"] == "measured" and entry["source"] == "nvml"
    assert [r["labels"] for r in entry["runs"]] == [{"run": 0}, {"run": 1}, {"run": 2}]
    names = [f.metric for f in figs]
    assert names == [
        "gpu_mean_power_w_decode_c1", "gpu_peak_power_w_decode_c1", "gpu_energy_j_decode_c1",
        "gpu_output_tok_per_j_decode_c1", "gpu_peak_memory_gib_decode_c1",
    ]  # fmt: skip
    power = figs[0]
    assert power.runs == pytest.approx((150.0, 150.0, 150.0)) and power.unit == "W"
    assert any(n.startswith("run 1: nvml every 10 ms; 0:") for n in power.notes)
    assert all(math.isfinite(v) for f in figs for v in f.runs)
    assert not m.telemetry or not m.telemetry._alive()


def test_measurement_without_an_accelerator_records_the_reason_only() -> None:
    m, results, figs = measurement(telemetry.sampler_for("auto", 100, "cpu", 0, {}).__enter__())
    m.keep([({"run": 0}, run_result(0, S))])
    m.finish_telemetry("node")
    assert figs == []
    assert results.telemetry["node"]["status"] == "not measured: no accelerator"
    assert results.telemetry["node"]["runs"][0]["status"] == "not measured: no accelerator"
    again = SessionResults.from_dict(results.to_dict())
    assert again.telemetry == results.telemetry and again.lab()["telemetry"] == results.telemetry
    assert SessionResults.merge([results, SessionResults()]).telemetry == results.telemetry


# --------------------------------------------------------------------------- overhead benchmark


@pytest.fixture
def scripted() -> Iterator[Endpoint]:
    with scripted_server.process(5, 2) as endpoint:
        yield endpoint


def test_overhead_benchmark_runs_abba_against_the_stand_in(
    scripted: Endpoint, tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import telemetry_overhead as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fake = FakeNvml([FakeCard(lambda t: 200.0)])
    result = bench.overhead(
        scripted, levels=[1, 4], requests=4, output_tokens=8, prompt_tokens=4, repetitions=2,
        make_sampler=lambda: nvml_sampler(fake, interval_ms=10),
    )  # fmt: skip
    runs = result["runs"]
    assert [(r["concurrency"], r["sampler"]) for r in runs] == [
        # ABBA: the side that leads alternates by repetition (an order effect cancels)
        (c, s)
        for c in (1, 4)
        for rep in range(2)
        for s in ((False, True), (True, False))[rep]
    ]
    assert all(r["failed"] == 0 and r["chunks_per_s"] > 0 for r in runs)
    assert all(r["telemetry_status"] == "measured" for r in runs if r["sampler"])
    assert any(r["telemetry_ticks"] > 0 for r in runs if r["sampler"])
    for row in result["levels"]:
        assert row["median_tpot_ms"]["ratio"] is not None and row["chunks_per_s"]["ratio"] > 0
    table = bench.table(result["levels"])
    assert table[0].startswith("| c | TPOT without") and len(table) == 4
    # The command line, as the GPU script runs it (here NVML is absent: not measured, said so).
    out = tmp_path / "overhead.json"
    argv = ["--base-url", scripted.base_url, "--model", "scripted", "--concurrency", "2"]
    argv += ["--requests", "2", "--output-tokens", "4", "--repetitions", "1", "--out", str(out)]
    assert bench.main([*argv, "--profile", "cuda-llamacpp-smollm2"]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "servelab-telemetry-overhead" and len(doc["runs"]) == 2
    assert all(r["failed"] == 0 for r in doc["runs"])
    if importlib.util.find_spec("pynvml") is None:
        assert doc["levels"][0]["telemetry"] == [
            "not measured: pynvml is not importable "
            "(No module named 'pynvml'); install nvidia-ml-py"
        ]


# --------------------------------------------------------------------------- report


def test_report_reads_power_and_memory_over_each_run() -> None:
    import base64

    from servelab import report_data, report_plots

    t = summarize(filled(steady({"0": 100.0, "1": 50.0}, 9)), S, 8 * S, 300, 100)
    results = SessionResults()
    results.telemetry["perf/test_decode.py::test_decode_c1[gpu]"] = telemetry.entry(
        filled([]), [({"run": 0}, run_result(S, 8 * S), t)]
    )
    results.telemetry["perf/test_decode.py::test_decode_c1[cpu]"] = telemetry.entry(
        Sampler(None, 100, "not measured: no accelerator"), []
    )
    runs = report_data.telemetry_runs({"lab": results.lab()})
    assert [(r.test.split("[")[1], r.status) for r in runs] == [
        ("cpu]", "not measured: no accelerator"),
        ("gpu]", "measured"),
    ]
    gpu = runs[1]
    assert gpu.labels == "run 0" and gpu.energy_j == pytest.approx(1050.0)
    assert gpu.t_s[0] == 0.0 and gpu.power_w[0] == 150.0 and gpu.memory_gib[-1] == 2 * (5.0 + 8)
    assert report_data.telemetry_runs({"lab": {}}) == []  # a record from before telemetry
    if report_plots.available() is None:
        png = report_plots.telemetry_png(runs, "test_decode_c1")
        assert png is not None and base64.b64decode(png).startswith(b"\x89PNG")
    assert report_plots.telemetry_png(runs[:1], "x") is None  # nothing to draw


# --------------------------------------------------------------------------- the plugin

FAKE_PYNVML = '''
"""A stand-in pynvml for this pytester session (no NVIDIA card here): 150 W, 12 GiB."""
import time
NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
class NVMLError(Exception):
    pass
class _Mem:
    used = 12 * 1024**3
class _Util:
    gpu, memory = 97, 40
_t0 = [0.0]
def nvmlInit(): _t0[0] = time.perf_counter()
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetPowerUsage(h): return 150_000
def nvmlDeviceGetTotalEnergyConsumption(h): return round((time.perf_counter() - _t0[0]) * 150_000)
def nvmlDeviceGetClockInfo(h, kind): return 1980
def nvmlDeviceGetMemoryInfo(h): return _Mem()
def nvmlDeviceGetTemperature(h, kind): return 45
def nvmlDeviceGetUtilizationRates(h): return _Util()
'''

PERF_TEST = """
import time
import pytest
from servelab.client import RequestRecord
from servelab.figures import Shape
from servelab.loadgen import RunResult
pytestmark = pytest.mark.perf

def rec(t0):
    return RequestRecord(
        index=0, api="completions", arrival_ns=t0, send_ns=t0, first_token_ns=t0 + 1,
        first_text_ns=t0 + 1, end_ns=t0 + 2, done_ns=t0 + 3, chunk_ns=(t0 + 1, t0 + 2),
        chunk_tokens=(1, 1), text="x", finish_reason="length", prompt_tokens=16,
        completion_tokens=8, cached_tokens=None, requested_prompt_tokens=16,
        requested_output_tokens=8, status_code=200, error=None)

def test_decode_c1(servelab_measure):
    m = servelab_measure
    runs = []
    for i in range(3):
        start = time.perf_counter_ns()
        time.sleep(0.05)
        end = time.perf_counter_ns()
        runs.append(({"run": i}, RunResult((rec(start),), start, end, 1, 1, (), 50.0)))
    m.keep(runs)
    m.record("decode_tok_s", [100.0, 101.0, 99.0], Shape(16, 8, 1))
"""


@pytest.mark.parametrize("mode", ["nvml", "auto"])
def test_the_plugin_records_telemetry_per_perf_test(pytester: pytest.Pytester, mode: str) -> None:
    """Through the installed plugin against the quality stub: `--telemetry nvml` (a stand-in
    pynvml on the session's path) records the figures and the record's lab.telemetry; the
    default on an external endpoint records only why it measured nothing."""

    from tests.test_quality import GOOD, Stub

    pytester.makepyfile(test_perf=PERF_TEST, pynvml=FAKE_PYNVML)
    q = pytester.path / "q.toml"
    q.write_text(GOOD)
    results = pytester.path / "results"
    with Stub("right") as stub:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--endpoint", stub.url + "/v1", f"--quality-file={q}",
            f"--results-dir={results}", f"--baselines-dir={pytester.path / 'baselines'}",
            f"--telemetry={mode}", "--telemetry-interval-ms=10", "test_perf.py",
        )  # fmt: skip
    result.assert_outcomes(passed=1)
    (path,) = (results / "records").glob("*/record.json")
    record = json.loads(path.read_text())
    (entry,) = record["lab"]["telemetry"].values()
    metrics = [f["metric"] for f in record["results"][0]["figures"]]
    if mode == "auto":
        assert entry["status"].startswith("not measured: external endpoint")
        assert metrics == ["decode_tok_s"]
        return
    assert entry["status"] == "measured" and len(entry["runs"]) == 3
    assert metrics == [
        "decode_tok_s", "gpu_mean_power_w_decode_c1", "gpu_peak_power_w_decode_c1",
        "gpu_energy_j_decode_c1", "gpu_output_tok_per_j_decode_c1", "gpu_peak_memory_gib_decode_c1",
    ]  # fmt: skip
    power = next(f for f in record["results"][0]["figures"] if f["metric"].startswith("gpu_mean"))
    assert power["runs"] == pytest.approx([150.0] * 3) and power["unit"] == "W"
