"""Integrity audits: checks that a measured "speedup" or a counted token is what it claims
(issue 24, item 3; MLPerf LoadGen's compliance tests TEST04, TEST06, TEST09 and the B70
lab's `cache_zero` and `exact_vs_own_solo` gates). Pure functions over the client's request
records; the perf tests send the requests, these judge them.

- **cache**: a measured prompt sent again may not be faster past `threshold` (TEST04: 10 %)
  unless the profile declares caching, and a measured prompt's cached-token count must be
  zero (the lab's `cache_zero`).
- **token counts**: the server's usage count, the streamed chunks' token ids and (where a
  counter is given) the re-tokenized text agree; the first token came; a forced length ends
  on "length" and an EOS on "stop" (TEST06).
- **output length**: without `ignore_eos`, the mean output length is within +/-10 % of the
  length asked for (TEST09); with `ignore_eos`, every request's output length is exactly the
  length asked for (a server that ignores the forced length measures other work).
- **batch invariance**: greedy outputs under concurrent load are identical to the same
  server's solo outputs for the same prompts (the lab's `exact_vs_own_solo`), reported as
  the share identical and the first divergence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from servelab import metrics
from servelab.client import RequestRecord

#: LoadGen TEST04: a reissued sample may not be more than 10 % faster.
CACHE_THRESHOLD = 0.10
#: LoadGen TEST09: mean output length within +/-10 %.
LENGTH_TOLERANCE = 0.10


@dataclass(frozen=True)
class Audit:
    """One audit's verdict: its figure (`value`, in `unit`) and what failed, if anything."""

    name: str
    value: float | None
    unit: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        v = "n/a" if self.value is None else f"{self.value:.4g} {self.unit}"
        return f"{self.name}: {v}: " + ("PASS" if self.ok else "FAIL: " + "; ".join(self.problems))


def cache_audit(
    first: Sequence[RequestRecord],
    again: Sequence[RequestRecord],
    *,
    threshold: float = CACHE_THRESHOLD,
    caching_declared: bool = False,
) -> Audit:
    """`again[i]` re-sends `first[i]`'s prompt. Value: the median TTFT speedup of the reissue
    (first / again - 1)."""
    problems = [
        f"request {r.index}: {r.cached_tokens} prompt tokens came from a cache"
        for r in first
        if r.cached_tokens
    ]
    pairs = [
        (a, b)
        for x, y in zip(first, again, strict=True)
        if (a := metrics.ttft_s(x)) is not None and (b := metrics.ttft_s(y)) is not None and b > 0
    ]
    if not pairs:
        return Audit("cache", None, "", (*problems, "no request pair with a first token"))
    speedups = sorted(a / b - 1 for a, b in pairs)
    value = speedups[len(speedups) // 2]
    if value > threshold and not caching_declared:
        problems.append(
            f"a measured prompt sent again was {value * 100:.0f}% faster (median of "
            f"{len(pairs)}), over {threshold * 100:g}%: the server caches what the profile "
            "does not declare (declare it, or turn the cache off)"
        )
    return Audit("cache", value, "x faster - 1", tuple(problems))


def token_audit(
    records: Sequence[RequestRecord], count: Callable[[str], int] | None = None, slack: int = 1
) -> Audit:
    """Usage vs streamed token ids vs re-tokenized text (within `slack`: a tokenizer may
    merge across the boundary), the first token, and the finish reason. Value: the share of
    requests with every count consistent."""
    problems: list[str] = []
    good = 0
    for r in records:
        mine: list[str] = []
        if not r.success:
            mine.append(f"failed: {r.error}")
        elif r.first_token_ns is None:
            mine.append("no first token")
        streamed = sum(t for t in r.chunk_tokens if t is not None)
        known = all(t is not None for t in r.chunk_tokens)
        if r.completion_tokens is None:
            mine.append("no usage count")
        elif known and streamed != r.completion_tokens:
            mine.append(f"usage says {r.completion_tokens} tokens, the stream carried {streamed}")
        if count is not None and r.completion_tokens is not None:
            n = count(r.text)
            if abs(n - r.completion_tokens) > slack:
                mine.append(f"the text re-tokenizes to {n}, usage says {r.completion_tokens}")
        forced = r.requested_output_tokens
        if forced is not None and r.completion_tokens == forced and r.finish_reason != "length":
            mine.append(f"{forced} tokens as forced, but finish_reason {r.finish_reason!r}")
        done = r.completion_tokens
        if (
            forced is not None
            and done is not None
            and done < forced
            and r.finish_reason == "length"
        ):
            mine.append(f"finish 'length' after {r.completion_tokens} of {forced} tokens")
        good += not mine
        problems += [f"request {r.index}: {m}" for m in mine]
    value = good / len(records) if records else None
    return Audit("token counts", value, "share consistent", tuple(problems))


def length_audit(
    records: Sequence[RequestRecord], asked: int, tolerance: float = LENGTH_TOLERANCE
) -> Audit:
    """Without `ignore_eos`: the mean output length over `asked` (value: that ratio)."""
    lengths = [r.completion_tokens for r in records if r.completion_tokens is not None]
    if not lengths:
        return Audit("output length", None, "", ("no usage counts",))
    ratio = sum(lengths) / len(lengths) / asked
    problems: tuple[str, ...] = ()
    if abs(ratio - 1) > tolerance:
        problems = (
            f"mean output {ratio * asked:.1f} tokens for {asked} asked "
            f"({(ratio - 1) * 100:+.0f}%, allowed +/-{tolerance * 100:g}%)",
        )
    return Audit("output length", ratio, "of asked", problems)


def forced_length_audit(records: Sequence[RequestRecord], asked: int) -> Audit:
    """With `ignore_eos`: every request's output length (usage, else token ids) equals
    `asked`. Value: the share of requests that got exactly that many tokens."""
    if not records:
        return Audit("forced length", None, "", ("no requests",))
    problems = [
        f"request {r.index}: {r.output_tokens} output tokens for {asked} forced "
        f"(finish {r.finish_reason!r}{'' if r.success else f', failed: {r.error}'})"
        for r in records
        if r.output_tokens != asked
    ]
    value = 1 - len(problems) / len(records)
    return Audit("forced length", value, "share exact", tuple(problems))


def length_ratios(records: Sequence[RequestRecord], asked: int) -> list[float | None]:
    """Each request's output length over `asked` (None where nothing counted it): the
    output-length audits' figure values, one per request."""
    return [None if r.output_tokens is None else r.output_tokens / asked for r in records]


def batch_invariance(solo: Sequence[RequestRecord], batched: Sequence[RequestRecord]) -> Audit:
    """`batched[i]` is `solo[i]`'s prompt sent under concurrent load (greedy, same seed).
    Value: the share of outputs identical; each differing one names its first divergence."""
    by_index = {r.index: r for r in batched}
    same = 0
    problems: list[str] = []
    for s in solo:
        b = by_index.get(s.index)
        if b is None:
            problems.append(f"request {s.index}: not sent under load")
            continue
        if s.text == b.text:
            same += 1
            continue
        at = next(
            (i for i, (x, y) in enumerate(zip(s.text, b.text, strict=False)) if x != y),
            min(len(s.text), len(b.text)),
        )
        problems.append(
            f"request {s.index}: output under load differs from solo at character {at} "
            f"({s.text[at : at + 20]!r} vs {b.text[at : at + 20]!r})"
        )
    value = same / len(solo) if solo else None
    return Audit("batch invariance", value, "share identical", tuple(problems))
