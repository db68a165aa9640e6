"""Request traces in the published Mooncake layout, read, checked and turned into a replay
schedule.

One JSON object per line::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]}

``timestamp`` is the request's arrival in milliseconds from the trace's start, ``input_length``
and ``output_length`` are token counts, ``hash_ids`` name the prompt's blocks (Mooncake's
blocks are 512 tokens): two requests that share a leading run of ids share that prefix.
Lines are validated through `servelab.schema` (strict types, no unknown keys) and then as a
whole: timestamps never fall back, lengths are positive, a prompt has no more blocks than
its tokens fill. Blank lines are skipped.

The replay is open loop: request i becomes due at ``(timestamp_i - timestamp_0) / speedup``
seconds after the run starts (`replay_offsets`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from servelab.errors import ConfigError
from servelab.prompts import salt_rng
from servelab.schema import read

#: Tokens per hash id in the published Mooncake traces.
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceEntry:
    """One request of a trace."""

    timestamp: int  # ms from the trace's start
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trace:
    entries: tuple[TraceEntry, ...]
    source: str  # the file it came from
    sha256: str  # of the file's bytes: which trace a figure replayed
    block_tokens: int = MOONCAKE_BLOCK_TOKENS

    @property
    def span_s(self) -> float:
        """Seconds from the first arrival to the last, at speed 1."""
        if not self.entries:
            return 0.0
        return (self.entries[-1].timestamp - self.entries[0].timestamp) / 1000.0

    def shared_block_share(self) -> float:
        """Share of all prompt blocks whose hash id an earlier request already sent: how
        much of the trace a prefix cache could serve."""
        seen: set[int] = set()
        total = shared = 0
        for e in self.entries:
            for h in e.hash_ids:
                total += 1
                shared += h in seen
                seen.add(h)
        return shared / total if total else 0.0

    def describe(self, speedup: float = 1.0) -> str:
        """The trace as a figure's note labels it."""
        ins = [e.input_length for e in self.entries]
        outs = [e.output_length for e in self.entries]
        return (
            f"trace {Path(self.source).name} (sha256 {self.sha256[:12]}): "
            f"{len(self.entries)} requests over {self.span_s:.3g} s, replayed at "
            f"{speedup:g}x speed; input {min(ins)}-{max(ins)} tokens, output "
            f"{min(outs)}-{max(outs)} tokens; {self.shared_block_share() * 100:.0f} % of "
            f"hash-id blocks repeat an earlier one"
        )


def parse_trace(text: str, *, source: str, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """A trace from JSONL text; ConfigError names the line and field that is wrong."""
    entries: list[TraceEntry] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not a JSON object ({exc.msg}); a trace holds one object per line"
            ) from None
        entries.append(read(TraceEntry, raw, file=where, error=ConfigError))
        _check_entry(entries[-1], entries[-2] if len(entries) > 1 else None, where, block_tokens)
    if not entries:
        raise ConfigError(f"{source}: the trace holds no requests")
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Trace(tuple(entries), source, digest, block_tokens)


def _check_entry(e: TraceEntry, prev: TraceEntry | None, where: str, block: int) -> None:
    if e.timestamp < 0:
        raise ConfigError(f"{where}: field 'timestamp' must be >= 0 ms (got {e.timestamp})")
    if prev is not None and e.timestamp < prev.timestamp:
        raise ConfigError(
            f"{where}: field 'timestamp' {e.timestamp} falls before the previous line's "
            f"{prev.timestamp}; sort the trace by timestamp"
        )
    for name in ("input_length", "output_length"):
        if getattr(e, name) < 1:
            raise ConfigError(
                f"{where}: field {name!r} must be >= 1 token (got {getattr(e, name)})"
            )
    if len(e.hash_ids) > math.ceil(e.input_length / block):
        raise ConfigError(
            f"{where}: {len(e.hash_ids)} hash_ids for {e.input_length} input tokens; at "
            f"{block} tokens a block it fills at most {math.ceil(e.input_length / block)}"
        )


def load_trace(path: Path, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """Read and check a trace file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"trace {path}: cannot read it ({exc.strerror}); check the path"
        ) from None
    return parse_trace(text, source=str(path), block_tokens=block_tokens)


def replay_offsets(trace: Trace, speedup: float = 1.0) -> tuple[float, ...]:
    """Each request's due time in seconds from the run's start: its timestamp less the
    first one's, divided by `speedup` (2.0: twice as fast).

    >>> t = parse_trace('{"timestamp": 100, "input_length": 8, "output_length": 2}\\n'
    ...                 '{"timestamp": 1100, "input_length": 8, "output_length": 2}', source="t")
    >>> replay_offsets(t, 2.0)
    (0.0, 0.5)
    """
    if not (math.isfinite(speedup) and speedup > 0):
        raise ConfigError(f"trace replay: speedup must be a finite number > 0 (got {speedup})")
    t0 = trace.entries[0].timestamp
    return tuple((e.timestamp - t0) / 1000.0 / speedup for e in trace.entries)


def lengths(trace: Trace) -> Sequence[tuple[int, int]]:
    """(input, output) tokens per request, in trace order."""
    return [(e.input_length, e.output_length) for e in trace.entries]


# --------------------------------------------------------------------------- shared prefixes


def _prefix_hits(trace: Trace) -> list[int]:
    """Per request: how many of its leading hash ids an earlier request already sent as the
    same leading run (prefix caching reuses a block only after the same blocks before it)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for e in trace.entries:
        ids = e.hash_ids
        k = 0
        while k < len(ids) and ids[: k + 1] in seen:
            k += 1
        out.append(k)
        seen.update(ids[: j + 1] for j in range(len(ids)))
    return out


def cacheable_tokens(trace: Trace, cache_block: int | None = None) -> list[int]:
    """Per request: prompt tokens a prefix cache could serve, from the trace's hash ids (the
    same id, the same `block_tokens` tokens). With `cache_block` (the engine's block size),
    only whole engine blocks count and the prompt's last token is always computed, as in
    vLLM."""
    out = []
    for e, k in zip(trace.entries, _prefix_hits(trace), strict=True):
        shared = min(k * trace.block_tokens, e.input_length)
        if cache_block:
            shared = min(shared, e.input_length - 1) // cache_block * cache_block
        out.append(shared)
    return out


def cacheable_share(trace: Trace, cache_block: int | None = None) -> float:
    """Share of all prompt tokens a prefix cache could serve (`cacheable_tokens`)."""
    total = sum(e.input_length for e in trace.entries)
    return sum(cacheable_tokens(trace, cache_block)) / total


def prompt_token_ids(trace: Trace, pool: Sequence[int], *, nonce: str) -> list[list[int]]:
    """Each request's prompt as token ids: hash id h is the same `block_tokens` ids wherever
    it appears (drawn from `pool`, seeded by `nonce` and h), truncated to the request's
    input length; tokens past its hash ids are its own. A new `nonce` gives prompts that
    share nothing with an earlier replay's.

    >>> t = parse_trace('{"timestamp": 0, "input_length": 3, "output_length": 1, '
    ...                 '"hash_ids": [7]}\\n{"timestamp": 1, "input_length": 4, '
    ...                 '"output_length": 1, "hash_ids": [7]}', source="t", block_tokens=2)
    >>> a, b = prompt_token_ids(t, range(100, 200), nonce="n")
    >>> (len(a), len(b), a[:2] == b[:2], a[2:] == b[2:3])
    (3, 4, True, False)
    """
    if not pool:
        raise ConfigError("trace replay: an empty token pool; prompts need token ids to draw")
    ids = tuple(pool)

    def draw(salt: str, n: int) -> list[int]:
        return [ids[j] for j in salt_rng(f"{nonce}:{salt}").integers(0, len(ids), size=n)]

    out = []
    for i, e in enumerate(trace.entries):
        tokens = [t for h in e.hash_ids for t in draw(f"block{h}", trace.block_tokens)]
        if len(tokens) < e.input_length:
            tokens += draw(f"tail{i}", e.input_length - len(tokens))
        out.append(tokens[: e.input_length])
    return out
