"""(Over 400 lines: two readers, NVML and xpu-smi, each small; one protocol.)
Where accelerator telemetry comes from: NVML (through `pynvml`, the `nvidia-ml-py`
package) for NVIDIA cards, and Intel's `xpu-smi dump` for Intel GPUs (the lab's B70s).

A source yields ticks: every card it reads at one instant, as `Reading`s stamped with
`time.perf_counter_ns()` on this side (the client's clock, so a run's bounds slice them
directly). What cannot be read is a labeled reason, never a zero: a library or tool that is
missing or refuses (`TelemetryUnavailable`), a card that went away (`Tick.lost`), a value the
card does not report (`None`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from servelab.errors import ServelabError

GIB = 1024**3


class TelemetryUnavailable(ServelabError):
    """No telemetry can be read at all: the library or tool is missing, refuses (permission)
    or knows none of the cards asked for. The message is the "not measured" reason."""


@dataclass(frozen=True)
class Reading:
    """One card at one instant. Missing is None, never 0."""

    card: str  # the card as the source names it: NVML index or UUID, xpu-smi device id
    t_ns: int  # perf_counter_ns on arrival here
    power_w: float | None = None
    energy_j: float | None = None  # the card's running energy counter
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    memory_used_gib: float | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None


@dataclass(frozen=True)
class Tick:
    readings: tuple[Reading, ...]
    lost: tuple[tuple[str, str], ...] = ()  # (card, why) of cards gone at this tick


class Source(Protocol):
    name: str

    def open(self) -> None:
        """Raise TelemetryUnavailable with the reason when nothing can be read."""

    def ticks(self, interval_s: float, stop: threading.Event) -> Iterator[Tick]:
        """Ticks until `stop` is set (one more after it, where the source can read on
        demand), or until the source ends."""

    def interrupt(self) -> None:
        """Unblock `ticks` from another thread (the sampler is stopping)."""

    def close(self) -> None:
        """Release the source once `ticks` has returned."""


# --------------------------------------------------------------------------- NVML


def _nvml_error_name(exc: BaseException) -> str:
    return type(exc).__name__.removeprefix("NVMLError_")


class NvmlSource:
    """NVIDIA cards through NVML: power (mW), the total-energy counter (mJ; NotSupported on
    some cards, then power is integrated instead), SM and memory clocks, memory used,
    temperature and utilization. `cards` are NVML indices (PCI bus order: set
    CUDA_DEVICE_ORDER=PCI_BUS_ID for CUDA to agree) or UUIDs; empty: every card."""

    name = "nvml"

    def __init__(
        self,
        cards: Sequence[str] = (),
        *,
        module: ModuleType | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.cards = tuple(cards)
        self._module = module
        self._clock = clock
        self._nvml: Any = None
        self._handles: dict[str, Any] = {}
        self._energy: dict[str, bool] = {}  # whether each card has the energy counter

    def open(self) -> None:
        nvml: Any = self._module
        if nvml is None:
            try:
                import pynvml

                nvml = pynvml
            except ImportError as exc:
                raise TelemetryUnavailable(
                    f"pynvml is not importable ({exc}); install nvidia-ml-py"
                ) from None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise TelemetryUnavailable(f"NVML did not start: {_nvml_error_name(exc)}") from None
        self._nvml = nvml
        try:
            cards = self.cards or tuple(str(i) for i in range(nvml.nvmlDeviceGetCount()))
            for card in cards:
                if card.isdigit():
                    handle = nvml.nvmlDeviceGetHandleByIndex(int(card))
                else:
                    # bytes: older nvidia-ml-py passes it to c_char_p as it is
                    handle = nvml.nvmlDeviceGetHandleByUUID(card.encode())
                self._handles[card] = handle
                nvml.nvmlDeviceGetPowerUsage(handle)  # NoPermission shows here
                try:
                    nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    self._energy[card] = True
                except nvml.NVMLError:
                    self._energy[card] = False
        except nvml.NVMLError as exc:
            self.close()
            raise TelemetryUnavailable(
                f"NVML refused card {card}: {_nvml_error_name(exc)}"
                + (" (permission denied)" if _nvml_error_name(exc) == "NoPermission" else "")
            ) from None
        if not self._handles:
            self.close()
            raise TelemetryUnavailable("NVML sees no card")

    def _read_card(self, card: str, handle: Any, t_ns: int) -> Reading:
        nvml = self._nvml

        def value(read: Callable[[], Any]) -> Any:
            try:
                return read()
            except nvml.NVMLError as exc:
                if _nvml_error_name(exc) == "GpuIsLost":
                    raise
                return None  # NotSupported and the like: this value is missing

        power = value(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        energy = (
            value(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            if self._energy.get(card)
            else None
        )
        memory = value(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        util = value(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        return Reading(
            card=card,
            t_ns=t_ns,
            power_w=None if power is None else power / 1000.0,
            energy_j=None if energy is None else energy / 1000.0,
            sm_clock_mhz=value(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            memory_clock_mhz=value(
                lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)
            ),
            memory_used_gib=None if memory is None else memory.used / GIB,
            temperature_c=value(
                lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            ),
            utilization_pct=None if util is None else util.gpu,
        )

    def read(self) -> Tick:
        """Every remaining card, now; a card that NVML says is lost leaves the set."""
        readings: list[Reading] = []
        lost: list[tuple[str, str]] = []
        t_ns = self._clock()
        for card, handle in list(self._handles.items()):
            try:
                readings.append(self._read_card(card, handle, t_ns))
            except self._nvml.NVMLError as exc:
                del self._handles[card]
                lost.append((card, f"NVML {_nvml_error_name(exc)}"))
        return Tick(tuple(readings), tuple(lost))

    def ticks(self, interval_s: float, stop: threading.Event) -> Iterator[Tick]:
        due = time.perf_counter()
        while not stop.is_set() and self._handles:
            yield self.read()
            due += interval_s
            stop.wait(max(0.0, due - time.perf_counter()))
        if self._handles:
            yield self.read()  # the bracket after the last run's end

    def interrupt(self) -> None:
        pass  # `ticks` waits on the stop event itself

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = None
        self._handles.clear()


# --------------------------------------------------------------------------- xpu-smi

#: The `xpu-smi dump -m` metric ids servelab asks for, and the column each one prints.
XPU_METRICS: dict[int, str] = {
    0: "GPU Utilization (%)",
    1: "GPU Power (W)",
    2: "GPU Frequency (MHz)",
    3: "GPU Core Temperature (Celsius Degree)",
    8: "GPU Energy Consumed (J)",
    18: "GPU Memory Used (MiB)",
}
_XPU_FIELDS = {
    "GPU Utilization (%)": ("utilization_pct", 1.0),
    "GPU Power (W)": ("power_w", 1.0),
    "GPU Frequency (MHz)": ("sm_clock_mhz", 1.0),
    "GPU Core Temperature (Celsius Degree)": ("temperature_c", 1.0),
    "GPU Energy Consumed (J)": ("energy_j", 1.0),
    "GPU Memory Used (MiB)": ("memory_used_gib", 1.0 / 1024),
}


@dataclass
class DumpParser:
    """`xpu-smi dump` CSV, line by line: a header (`Timestamp, DeviceId, GPU Utilization
    (%), ...`) then one row per device per interval (`06:14:46.000,    0, 0.00, 14.61, ...`).
    A value `N/A` (or empty) is None; a line that does not parse (truncated, garbled, a
    message between rows) is skipped and counted, with the first few kept as reasons.

    A row is placed on the client's clock by its own timestamp (xpu-smi's local time of
    day): `clock()` minus its age against `wall()` (now, as seconds of the local day), so a
    pipe that delivers rows late does not move them; a row over a minute old, or from the
    future, takes its arrival time."""

    clock: Callable[[], int] = time.perf_counter_ns
    wall: Callable[[], float] = field(default=lambda: _local_time_of_day())
    columns: tuple[str, ...] = ()
    skipped: int = 0
    reasons: tuple[str, ...] = ()

    def _skip(self, line: str, why: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons = (*self.reasons, f"{why}: {line[:80]!r}")

    def feed(self, line: str) -> tuple[str, Reading] | None:
        """The row's timestamp text and reading, or None (a header or a skipped line)."""
        line = line.strip()
        if not line:
            return None
        cells = [c.strip() for c in line.split(",")]
        if cells[0] == "Timestamp":
            self.columns = tuple(cells)
            return None
        if not self.columns:
            self._skip(line, "row before any header")
            return None
        if len(cells) != len(self.columns):
            self._skip(line, f"{len(cells)} fields for {len(self.columns)} columns")
            return None
        stamp, device = cells[0], cells[1]
        if not device.isdigit() or not _is_stamp(stamp):
            self._skip(line, "no timestamp and device id")
            return None
        values: dict[str, float | None] = {}
        for name, cell in zip(self.columns[2:], cells[2:], strict=True):
            field = _XPU_FIELDS.get(name)
            if field is None:
                continue
            if cell in ("", "N/A"):
                values[field[0]] = None
                continue
            try:
                values[field[0]] = float(cell) * field[1]
            except ValueError:
                self._skip(line, f"{name} is not a number")
                return None
        t_ns = self.clock()
        age = self.wall() - _seconds_of_day(stamp)
        if age < -43200:  # the row is from before midnight
            age += 86400
        if 0 <= age < 60:
            t_ns -= int(age * 1e9)
        return stamp, Reading(card=device, t_ns=t_ns, **values)


def _is_stamp(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 3 and all(p.replace(".", "", 1).isdigit() for p in parts)


def _seconds_of_day(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _local_time_of_day() -> float:
    now = time.time()
    t = time.localtime(now)
    return t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec + now % 1


def dump_command(cards: Sequence[str], interval_s: float) -> list[str]:
    """The live command. xpu-smi's screen dump takes whole seconds (`-i`, at least 1)."""
    import shutil

    devices = ",".join(cards) if cards else "-1"
    metrics = ",".join(str(m) for m in XPU_METRICS)
    # Line-buffered where stdbuf exists: a pipe would otherwise hold rows back in blocks.
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    return [
        *line_buffered,
        "xpu-smi",
        "dump",
        "-d",
        devices,
        "-m",
        metrics,
        "-i",
        str(max(1, round(interval_s))),
    ]


class XpuSmiSource:
    """Intel GPUs through `xpu-smi dump`, run in its own process group and killed (the whole
    group) when the sampler stops. `lines` replaces the process with recorded text (tests).
    The dump ending while the sampler still runs loses every card still being read."""

    name = "xpu-smi"

    def __init__(
        self,
        cards: Sequence[str] = (),
        *,
        lines: Sequence[str] | None = None,
        command: Sequence[str] | None = None,
        parser: DumpParser | None = None,
    ) -> None:
        self.cards = tuple(cards)
        self._lines = lines
        self._command = list(command) if command is not None else None
        self.parser = parser or DumpParser()
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None

    def open(self) -> None:
        if self._lines is not None:
            return
        import shutil

        command = self._command or dump_command(self.cards, 1.0)
        tool = next((c for c in command if c not in ("stdbuf", "-oL")), command[0])
        if shutil.which(tool) is None:
            raise TelemetryUnavailable(f"{tool} is not on PATH (install Intel XPU Manager)")
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        try:
            self._proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,  # its own process group: killed whole in close()
            )
        except OSError as exc:  # not executable, permission denied
            self.close()
            raise TelemetryUnavailable(f"{tool} could not start ({exc})") from None

    def interval(self, interval_s: float) -> None:
        """Set the live command's interval (before `open`)."""
        if self._command is None:
            self._command = dump_command(self.cards, interval_s)

    def _source_lines(self) -> Iterator[str]:
        if self._lines is not None:
            yield from self._lines
            return
        assert self._proc is not None and self._proc.stdout is not None
        out = self._proc.stdout
        try:
            yield from out
        except ValueError:  # closed under us: the sampler stopped
            return
        finally:
            out.close()

    def ticks(self, interval_s: float, stop: threading.Event) -> Iterator[Tick]:
        # Rows of one timestamp are one tick, out as soon as every expected card has its
        # row (the cards asked for, else those of the first whole tick), else when the next
        # timestamp starts.
        stamp: str | None = None
        tick: list[Reading] = []
        seen: set[str] = set()
        expected = set(self.cards)
        for line in self._source_lines():
            row = self.parser.feed(line)
            if row is None:
                continue
            if stamp is not None and row[0] != stamp:
                expected = expected or set(seen)
                if tick:
                    yield Tick(tuple(tick))
                    tick = []
            stamp = row[0]
            if self.cards and row[1].card not in self.cards:
                continue
            seen.add(row[1].card)
            tick.append(row[1])
            if expected and {r.card for r in tick} >= expected:
                yield Tick(tuple(tick))
                tick = []
        if tick:
            yield Tick(tuple(tick))
        if stop.is_set():
            return
        why = self._ended()
        if not seen:
            raise TelemetryUnavailable(why)
        yield Tick((), tuple((card, why) for card in sorted(seen)))

    def _ended(self) -> str:
        if self._proc is None:
            return "xpu-smi dump stopped"
        code = self._proc.wait()
        err = ""
        try:
            if self._stderr is not None:
                self._stderr.seek(0)
                err = " ".join(self._stderr.read().split())[:200]
        except ValueError:  # closed: the sampler stopped meanwhile
            pass
        return f"xpu-smi dump stopped (exit {code}{': ' + err if err else ''})"

    def interrupt(self) -> None:
        """Kill the dump's whole process group (its stdout then ends)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(2)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever it left in its group
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self.interrupt()
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
