# Over 400 lines: the brief keeps the tools' parsers and the admission checks on their
# receipts in one module (issue 25).
"""Health receipts: what the host and its cards looked like before the first start
(admission) and after the last stop (post-run), and the checks made on them.

A receipt holds, per target: the accelerators as their tool reports them (``nvidia-smi`` or
``xpu-smi``: present, memory used, temperature, error/RAS counters, processes of others on
the card), available host memory, free disk under the results and cache folders, and the
kernel-log fault lines since the session began (where the log is readable). A tool that is
missing or denied is recorded as such, never guessed around.

Admission (`admit`) refuses, before any engine starts, when a card is missing, busy with
another process or faulted, when memory or disk are under the profile's `[limits]` floors,
or when the model path the engine would be given does not exist (vLLM would take it for a
hub repository id and fail ~30 s later with ``HFValidationError``). The post-run check
(`post_run_problems`) fails on a stop the profile's policy forbids (`servelab.stop_policy`),
a card that faulted or counted new errors during the run, and new kernel fault lines.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from servelab.errors import ServelabError
from servelab.profiles import Profile
from servelab.stop_policy import StopRecord

ToolStatus = Literal["ok", "missing", "denied", "failed"]
TOOL_TIMEOUT_S = 10.0
GIB = 2**30

NVIDIA_HEALTH = (
    "nvidia-smi",
    "--query-gpu=index,name,uuid,memory.used,memory.total,temperature.gpu,"
    "ecc.errors.uncorrected.volatile.total",
    "--format=csv,noheader,nounits",
)
NVIDIA_APPS = (
    "nvidia-smi",
    "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
    "--format=csv,noheader,nounits",
)
XPU_DISCOVERY = ("xpu-smi", "discovery", "-j")
XPU_PS = ("xpu-smi", "ps", "-j")
KERNEL_LOGS = (("dmesg",), ("journalctl", "-k", "-b", "-o", "short-monotonic", "--no-pager"))

_DENIED = re.compile(
    r"permission denied|operation not permitted|insufficient permissions|access denied", re.I
)
#: Kernel-log lines that mean a card, its driver or the host faulted (case-insensitive).
FAULT_PATTERNS = (
    r"NVRM: Xid",
    r"GPU has fallen off the bus",
    r"\b(i915|xe)\b.*\b(GPU HANG|hang|hung|wedged|reset|CAT error|fault)\b",
    r"\[drm\].*\*ERROR\*",
    r"PCIe Bus Error|\bAER\b.*(Uncorrected|Fatal)",
    r"Machine check|\bMCE\b",
    r"Out of memory: Killed process|oom-kill",
)
_FAULT = re.compile("|".join(f"(?:{p})" for p in FAULT_PATTERNS), re.I)
_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")


class AdmissionError(ServelabError):
    """The host, a card or the profile is not fit to start the engine (no engine started)."""


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolOutput:
    """One tool's answer: its stdout where it ran, else why not (missing, denied, failed)."""

    argv: tuple[str, ...]
    status: ToolStatus
    text: str = ""
    detail: str = ""

    def describe(self) -> str:
        what = " ".join(self.argv[:2])
        return f"{what}: {self.status}" + (f" ({self.detail})" if self.detail else "")


Probe = Callable[[Sequence[str]], ToolOutput]


def run_probe(argv: Sequence[str]) -> ToolOutput:
    """Run a read-only tool; a missing, denied or failing tool is an answer, not an error."""
    args = tuple(argv)
    if shutil.which(args[0]) is None:
        return ToolOutput(args, "missing", detail=f"{args[0]} is not on PATH")
    try:
        done = subprocess.run(
            list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except PermissionError as exc:
        return ToolOutput(args, "denied", detail=str(exc))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ToolOutput(args, "failed", detail=f"{type(exc).__name__}: {exc}")
    return classify(args, done.returncode, done.stdout, done.stderr)


def classify(argv: Sequence[str], code: int, stdout: str, stderr: str) -> ToolOutput:
    """A finished tool's status from its exit code and output (denied: the message says so)."""
    both = (stderr + "\n" + stdout).strip()
    first = next((line.strip() for line in both.splitlines() if line.strip()), "")
    if _DENIED.search(both):
        return ToolOutput(tuple(argv), "denied", stdout, first)
    if code != 0:
        return ToolOutput(tuple(argv), "failed", stdout, f"exit {code}: {first}")
    return ToolOutput(tuple(argv), "ok", stdout)


# --------------------------------------------------------------------------- parsers


@dataclass(frozen=True)
class Card:
    index: int
    name: str
    memory_used_mib: float | None = None
    temperature_c: float | None = None
    errors: Mapping[str, int] = field(default_factory=dict)  # counter -> value
    others: tuple[str, ...] = ()  # processes of others on the card
    fault: str = ""  # why the card counts as faulted ("" when healthy)


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_nvidia_health(query: str, apps: str = "", own_pids: Sequence[int] = ()) -> list[Card]:
    """`NVIDIA_HEALTH` output, plus `NVIDIA_APPS` for the processes on each card. A card
    nvidia-smi cannot reach ("Unable to determine the device handle", "[GPU requires
    reset]") or with uncorrected ECC errors is faulted."""
    by_uuid: dict[str, list[str]] = {}
    for line in apps.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[1].isdigit() and int(parts[1]) not in own_pids:
            by_uuid.setdefault(parts[0], []).append(f"pid {parts[1]} ({parts[2]}, {parts[3]} MiB)")
    cards: list[Card] = []
    for line in query.splitlines():
        if "Unable to determine the device handle" in line:
            cards.append(Card(len(cards), "unreachable", fault=line.strip()))
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 7 or not parts[0].isdigit():
            continue
        fault = ""
        if any("requires reset" in p for p in parts):
            fault = "nvidia-smi reports [GPU requires reset]"
        ecc = _num(parts[6])
        errors = {} if ecc is None else {"ecc_uncorrected_volatile": int(ecc)}
        if ecc and not fault:
            fault = f"{int(ecc)} uncorrected ECC error(s) since the driver loaded"
        cards.append(
            Card(
                int(parts[0]),
                parts[1],
                _num(parts[3]),
                _num(parts[5]),
                errors,
                tuple(by_uuid.get(parts[2], ())),
                fault,
            )
        )
    return cards


#: xpu-smi RAS counters that fault a card when above zero.
XPU_FAULT_COUNTERS = ("RESET", "DRIVER_ERRORS", "UNCORRECTABLE")


def parse_xpu_stats(text: str) -> tuple[float | None, float | None, dict[str, int]]:
    """`xpu-smi stats -d N -j`: (memory used MiB, core temperature C, RAS counters)."""
    data = json.loads(text)
    values: dict[str, float] = {}
    for row in data.get("device_level", []):
        if isinstance(row, dict) and isinstance(row.get("value"), int | float):
            values[str(row.get("metrics_type", ""))] = float(row["value"])
    errors = {
        k.removeprefix("XPUM_STATS_RAS_ERROR_CAT_").lower(): int(v)
        for k, v in values.items()
        if k.startswith("XPUM_STATS_RAS_ERROR_CAT_")
    }
    return (
        values.get("XPUM_STATS_MEMORY_USED"),
        values.get("XPUM_STATS_GPU_CORE_TEMPERATURE"),
        errors,
    )


def parse_xpu_ps(text: str, own_pids: Sequence[int] = ()) -> dict[int, list[str]]:
    """`xpu-smi ps -j`: other processes per device (xpu-smi itself and ours left out)."""
    out: dict[int, list[str]] = {}
    for row in json.loads(text).get("device_util_by_proc_list", []):
        pid, name = int(row["process_id"]), str(row.get("process_name", "?"))
        if name == "xpu-smi" or pid in own_pids:
            continue
        mib = float(row.get("mem_size", 0)) / 1024  # kB
        out.setdefault(int(row["device_id"]), []).append(f"pid {pid} ({name}, {mib:.0f} MiB)")
    return out


def xpu_fault(errors: Mapping[str, int]) -> str:
    bad = {
        k: v for k, v in errors.items() if v > 0 and any(c.lower() in k for c in XPU_FAULT_COUNTERS)
    }
    return (
        "" if not bad else "RAS counters " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    )


def parse_kernel_faults(text: str, since_s: float | None = None) -> list[str]:
    """Fault lines of `dmesg` / `journalctl -k -o short-monotonic` output, those stamped at or
    after ``since_s`` (seconds since boot) when given."""
    out = []
    for line in text.splitlines():
        m = _STAMP.match(line.strip())
        if since_s is not None and m and float(m.group(1)) < since_s:
            continue
        if _FAULT.search(line):
            out.append(line.strip())
    return out


def parse_mem_available_gib(meminfo: str) -> float | None:
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return None


# --------------------------------------------------------------------------- collecting


def read_cards(
    accelerator: str, probe: Probe, own_pids: Sequence[int] = ()
) -> tuple[list[Card], list[ToolOutput]]:
    """The cards of ``accelerator`` and the tool answers they came from (none for cpu)."""
    from servelab.hardware import parse_xpu_smi_discovery

    if accelerator == "cuda":
        query, apps = probe(NVIDIA_HEALTH), probe(NVIDIA_APPS)
        if query.status != "ok" and "Unable to determine" not in query.text:
            return [], [query, apps]
        return parse_nvidia_health(query.text, apps.text, own_pids), [query, apps]
    if accelerator != "xpu":
        return [], []
    disc = probe(XPU_DISCOVERY)
    if disc.status != "ok":
        return [], [disc]
    ps = probe(XPU_PS)
    busy = parse_xpu_ps(ps.text, own_pids) if ps.status == "ok" else {}
    tools, cards = [disc, ps], []
    for acc in parse_xpu_smi_discovery(disc.text):
        stats = probe(("xpu-smi", "stats", "-d", str(acc.index), "-j"))
        tools.append(stats)
        used = temp = None
        errors: dict[str, int] = {}
        if stats.status == "ok":
            used, temp, errors = parse_xpu_stats(stats.text)
        name = acc.name
        cards.append(
            Card(
                acc.index,
                name,
                used,
                temp,
                errors,
                tuple(busy.get(acc.index, ())),
                xpu_fault(errors),
            )
        )
    return cards, tools


def read_kernel_faults(probe: Probe, since_s: float | None) -> tuple[str, list[str]]:
    """(how the kernel log was read, its fault lines since ``since_s``)."""
    tried = []
    for argv in KERNEL_LOGS:
        out = probe(argv)
        if out.status == "ok":
            return f"read with {argv[0]}", parse_kernel_faults(out.text, since_s)
        tried.append(out.describe())
    return "not readable: " + "; ".join(tried), []


def _free_gib(folder: Path) -> float | None:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free / GIB
    except OSError:
        return None


def _meminfo() -> str:
    try:
        return Path("/proc/meminfo").read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------- receipts


@dataclass(frozen=True)
class Receipt:
    kind: str  # "admission" or "post_run"
    profile: str
    taken_at: float  # unix seconds
    accelerator: str
    cards: tuple[Card, ...] = ()
    tools: tuple[str, ...] = ()  # each tool's status ("nvidia-smi --query-gpu=...: ok")
    mem_available_gib: float | None = None
    disk_free_gib: Mapping[str, float | None] = field(default_factory=dict)
    kernel_log: str = "not read"
    kernel_faults: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cards"] = [{**asdict(c), "others": list(c.others)} for c in self.cards]
        for key in ("tools", "kernel_faults", "problems"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Receipt:
        cards = tuple(
            Card(**{**c, "others": tuple(c.get("others", ())), "errors": dict(c.get("errors", {}))})
            for c in d.get("cards", ())
        )
        return cls(
            str(d["kind"]),
            str(d["profile"]),
            float(d["taken_at"]),
            str(d["accelerator"]),
            cards,
            tuple(d.get("tools", ())),
            d.get("mem_available_gib"),
            dict(d.get("disk_free_gib", {})),
            str(d.get("kernel_log", "not read")),
            tuple(d.get("kernel_faults", ())),
            tuple(d.get("problems", ())),
        )


def take_receipt(
    profile: Profile,
    kind: str,
    *,
    folders: Sequence[Path] = (),
    since_s: float | None = None,
    probe: Probe = run_probe,
    meminfo: Callable[[], str] = _meminfo,
    read_kernel_log: bool = True,
    own_pids: Sequence[int] = (),
) -> Receipt:
    """One receipt for ``profile`` now. ``since_s``: the session's start in seconds since boot
    (`time.monotonic()`), to keep the kernel-log lines of this run only."""
    cards, tools = read_cards(profile.hardware.accelerator, probe, own_pids)
    how, faults = read_kernel_faults(probe, since_s) if read_kernel_log else ("not read", [])
    return Receipt(
        kind=kind,
        profile=profile.name,
        taken_at=time.time(),
        accelerator=profile.hardware.accelerator,
        cards=tuple(cards),
        tools=tuple(t.describe() for t in tools),
        mem_available_gib=parse_mem_available_gib(meminfo()),
        disk_free_gib={str(f): _free_gib(f) for f in folders},
        kernel_log=how,
        kernel_faults=tuple(faults),
    )


def admission_problems(profile: Profile, receipt: Receipt) -> list[str]:
    """Why ``profile``'s engine must not start on the host ``receipt`` describes."""
    name, hw, lim = profile.name, profile.hardware, profile.limits
    out: list[str] = []
    if hw.accelerator != "cpu":
        bad = [t for t in receipt.tools if not t.endswith(": ok")]
        if not receipt.cards and bad:
            out.append(
                f"profile {name!r}: cannot check the {hw.accelerator} cards ("
                + "; ".join(bad)
                + "): install the tool or grant access to it; servelab admits no run without "
                "a card-health receipt"
            )
        elif len(receipt.cards) < hw.count:
            out.append(
                f"profile {name!r} needs {hw.count} {hw.accelerator} card(s) but "
                f"{len(receipt.cards)} answer(s): check that every card is seated and its "
                "driver loaded"
            )
        for c in receipt.cards:
            if c.fault:
                out.append(
                    f"profile {name!r}: card {c.index} ({c.name}) is faulted: {c.fault}; "
                    "reset or repair it before running"
                )
            if c.others:
                out.append(
                    f"profile {name!r}: card {c.index} ({c.name}) is busy with another "
                    f"process: {', '.join(c.others)}; stop it or wait until the card is free"
                )
    mem = receipt.mem_available_gib
    if lim.min_free_memory_gib is not None and mem is not None and mem < lim.min_free_memory_gib:
        out.append(
            f"profile {name!r}: {mem:.1f} GiB of host memory available, under the floor of "
            f"{lim.min_free_memory_gib:g} GiB (limits.min_free_memory_gib): free memory first"
        )
    if lim.min_free_disk_gib is not None:
        for folder, free in receipt.disk_free_gib.items():
            if free is not None and free < lim.min_free_disk_gib:
                out.append(
                    f"profile {name!r}: {free:.1f} GiB free on the disk of {folder}, under the "
                    f"floor of {lim.min_free_disk_gib:g} GiB (limits.min_free_disk_gib): "
                    "free space first"
                )
    out += model_problems(profile)
    return out


def model_problems(profile: Profile) -> list[str]:
    """A model path the engine would be given (``{model}``) that does not exist."""
    m = profile.model
    uses = any("{model}" in part for part in (*profile.engine.command, *profile.engine.args))
    if m.source != "path" or not uses or m.path is None or Path(m.path).exists():
        return []
    where = f" in {profile.path}" if profile.path else ""
    return [
        f"profile {profile.name!r}: model.path {m.path!r} does not exist (model.source = "
        f"'path'){where}; the engine would take it for a hub repository id and fail "
        "(vLLM: HFValidationError after ~30 s). Fix model.path or put the model there"
    ]


def admit(profile: Profile, **kwargs: Any) -> Receipt:
    """The admission receipt of ``profile`` (`take_receipt` arguments), or AdmissionError
    naming every problem; call it before any engine of the profile starts."""
    receipt = take_receipt(profile, "admission", **kwargs)
    problems = admission_problems(profile, receipt)
    if problems:
        raise AdmissionError("admission refused, no engine started:\n  " + "\n  ".join(problems))
    return receipt


def post_run_problems(
    admission: Receipt | None, post: Receipt, stops: Sequence[StopRecord] = ()
) -> list[str]:
    """What the post-run health check holds against the run: stops the policy forbids, cards
    faulted or with more errors than at admission, kernel fault lines during the run."""
    out = [p for s in stops for p in s.problems()]
    before = {c.index: c for c in (admission.cards if admission else ())}
    for c in post.cards:
        if c.fault:
            out.append(
                f"profile {post.profile!r}: card {c.index} ({c.name}) is faulted after the "
                f"run: {c.fault}"
            )
        old = before.get(c.index)
        grew = {
            k: v - old.errors.get(k, 0)
            for k, v in c.errors.items()
            if old and v > old.errors.get(k, 0)
        }
        if grew:
            out.append(
                f"profile {post.profile!r}: card {c.index} counted new errors during the run: "
                + ", ".join(f"{k} +{v}" for k, v in sorted(grew.items()))
            )
    if admission and len(post.cards) < len(admission.cards):
        out.append(
            f"profile {post.profile!r}: {len(admission.cards) - len(post.cards)} card(s) "
            "no longer answer after the run"
        )
    out += [f"profile {post.profile!r}: kernel log: {line}" for line in post.kernel_faults]
    return out


def difference(admission: Receipt, post: Receipt) -> dict[str, Any]:
    """What changed between the two receipts (post minus admission)."""

    def delta(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    before = {c.index: c for c in admission.cards}
    cards = {}
    for c in post.cards:
        old = before.get(c.index)
        if old is None:
            continue
        cards[str(c.index)] = {
            "memory_used_mib": delta(old.memory_used_mib, c.memory_used_mib),
            "temperature_c": delta(old.temperature_c, c.temperature_c),
            "errors": {k: v - old.errors.get(k, 0) for k, v in c.errors.items()},
        }
    return {
        "seconds": round(post.taken_at - admission.taken_at, 3),
        "mem_available_gib": delta(admission.mem_available_gib, post.mem_available_gib),
        "disk_free_gib": {
            f: delta(admission.disk_free_gib.get(f), v) for f, v in post.disk_free_gib.items()
        },
        "cards": cards,
        "cards_answering": [len(admission.cards), len(post.cards)],
        "new_kernel_faults": len(post.kernel_faults),
    }


# --------------------------------------------------------------------------- session book


def admit_into(book: dict[str, dict[str, Any]], profile: Profile, **kwargs: Any) -> None:
    """Admission of ``profile`` written into ``book`` (`SessionResults.receipts`): the
    receipt with its problems is kept either way, then AdmissionError when there are any.
    Once per profile per process; a refusal is repeated, not re-examined."""
    entry = book.setdefault(profile.name, {})
    if "admission" not in entry:
        receipt = take_receipt(profile, "admission", **kwargs)
        problems = tuple(admission_problems(profile, receipt))
        entry["admission"] = dataclasses.replace(receipt, problems=problems).to_dict()
    problems = tuple(entry["admission"].get("problems", ()))
    if problems:
        raise AdmissionError("admission refused, no engine started:\n  " + "\n  ".join(problems))


def post_run_into(
    book: dict[str, dict[str, Any]],
    profiles: Sequence[Profile],
    stops: Mapping[str, StopRecord],
    **kwargs: Any,
) -> list[str]:
    """Post-run receipts, their problems and the difference from admission, written into
    ``book`` for every profile admitted (and started) here; returns every problem."""
    found: list[str] = []
    for profile in profiles:
        entry = book.get(profile.name)
        if not entry or "admission" not in entry or "post_run" in entry:
            continue
        admission = Receipt.from_dict(entry["admission"])
        if admission.problems:
            continue  # refused: nothing started, nothing to check
        post = take_receipt(profile, "post_run", **kwargs)
        stop = stops.get(profile.name)
        problems = post_run_problems(admission, post, [stop] if stop else [])
        entry["post_run"] = dataclasses.replace(post, problems=tuple(problems)).to_dict()
        entry["difference"] = difference(admission, post)
        found += problems
    return found
