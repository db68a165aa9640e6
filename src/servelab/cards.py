"""Card count as a variable (issue 16 item 4): a profile's `[cards]` axis expands into one
variant per count, and the variants' concurrency figures give throughput per card and
scaling efficiency.

Pure functions: expansion works on frozen `Profile`s, scaling on `Figure`s. Judging the
scaling figures and adding them to the session's results is `servelab.finish`'s, at the end
of the session, once every variant's figures exist (docs/cards.md).
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from servelab.catalogue import spec as metric_spec
from servelab.errors import ProfileError
from servelab.figures import Figure

if TYPE_CHECKING:
    from servelab.profiles import CardsSpec, EngineSpec, Profile

#: What the axis fills in a variant's command, arguments and environment values.
AXIS_PLACEHOLDERS = ("cards", "devices")
#: The concurrency figure scaling derives from, and the two derived figures.
SOURCE = "output_throughput_c{c}"
PER_CARD = "output_tok_s_per_card_c{c}"
EFFICIENCY = "scaling_efficiency_c{c}"


def variant_name(base: str, count: int) -> str:
    """`gemma4-12b-cards@2cards` (`@1card` for one): a valid path component, since the
    variant's baselines live under its name."""
    return f"{base}@{count}card{'' if count == 1 else 's'}"


def device_list(spec: CardsSpec | None, count: int) -> str:
    """The first `count` device ids, comma-separated (`{devices}`): the axis's `devices`, or
    0 .. count - 1."""
    ids = spec.devices if spec is not None and spec.devices else tuple(map(str, range(count)))
    return ",".join(ids[:count])


def fill_axis(template: str, values: Mapping[str, str]) -> str:
    """`template` with only the axis placeholders filled; every other `{field}` and every
    doubled brace stays as it was, for `Profile.render_command` to render later."""
    out: list[str] = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        field = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if name in values:
            field = field.format_map(values).replace("{", "{{").replace("}", "}}")
        out.append(field)
    return "".join(out)


def _fill_env(value: str, values: Mapping[str, str]) -> str:
    # Environment values are not templates (a literal brace stays one): only the axis's
    # placeholders are replaced, as written.
    for name, filled in values.items():
        value = value.replace("{" + name + "}", filled)
    return value


def _uses_axis(p: Profile) -> list[str]:
    formatter = string.Formatter()
    used = [
        part
        for part in (*p.engine.command, *p.engine.args)
        if {f for _, f, _, _ in formatter.parse(part)} & set(AXIS_PLACEHOLDERS)
    ]
    used += [
        f"{k}={v}"
        for k, v in p.engine.env.items()
        if any("{" + n + "}" in v for n in AXIS_PLACEHOLDERS)
    ]
    return used


def check_cards(p: Profile, where: str) -> None:
    """The `[cards]` table's semantic checks (called by `servelab.profiles` on load)."""
    spec = p.cards
    if spec is None:
        used = _uses_axis(p)
        if used:
            raise ProfileError(
                f"{where}: {used[0]!r} uses {{cards}} or {{devices}}, which only a profile with "
                "a [cards] table fills; add one (e.g. counts = [1, 2, 4]) or write the value"
            )
        return
    counts = spec.counts
    if not counts:
        raise ProfileError(f"{where}: field 'cards.counts' is empty; list card counts, e.g. [1, 2]")
    bad = [n for n in counts if n < 1]
    if bad:
        raise ProfileError(
            f"{where}: field 'cards.counts' has {bad[0]}: every card count must be >= 1"
        )
    dup = sorted({n for n in counts if counts.count(n) > 1})
    if dup:
        raise ProfileError(
            f"{where}: field 'cards.counts' lists {dup[0]} more than once; list each count once"
        )
    if p.hardware.accelerator == "cpu":
        raise ProfileError(
            f"{where}: a [cards] axis needs an accelerator; hardware.accelerator is 'cpu'"
        )
    if p.hardware.count != max(counts):
        raise ProfileError(
            f"{where}: field 'hardware.count' is {p.hardware.count} but must equal the largest "
            f"of cards.counts ({max(counts)}): the profile as written is its largest variant"
        )
    if spec.devices:
        if len(spec.devices) < max(counts):
            raise ProfileError(
                f"{where}: field 'cards.devices' names {len(spec.devices)} device(s) but "
                f"cards.counts goes up to {max(counts)}; name one id per card"
            )
        odd = [d for d in spec.devices if not d or "," in d or d.strip() != d]
        if odd or len(set(spec.devices)) != len(spec.devices):
            raise ProfileError(
                f"{where}: field 'cards.devices' must hold distinct ids without commas or "
                f"spaces (got {list(spec.devices)})"
            )


# --------------------------------------------------------------------------- expansion


def _engine_for(template: EngineSpec, spec: CardsSpec, n: int) -> EngineSpec:
    values = {"cards": str(n), "devices": device_list(spec, n)}
    return dataclasses.replace(
        template,
        command=tuple(fill_axis(a, values) for a in template.command),
        args=tuple(fill_axis(a, values) for a in template.args),
        env=types.MappingProxyType({k: _fill_env(v, values) for k, v in template.env.items()}),
    )


def fill_largest(p: Profile) -> Profile:
    """A loaded profile with an axis is its largest variant (hardware.count is the largest
    count): `{cards}` / `{devices}` filled for it, so it renders and hashes like any profile;
    the [engine] table as written stays in `cards.template` for `expand`."""
    spec = p.cards
    if spec is None or spec.template is not None:
        return p
    spec = dataclasses.replace(spec, template=p.engine)
    return dataclasses.replace(p, engine=_engine_for(p.engine, spec, max(spec.counts)), cards=spec)


def expand(profile: Profile, only: Collection[int] | None = None) -> tuple[Profile, ...]:
    """The profile's variants, fewest cards first (`only`: just these counts); a profile
    without an axis, or a variant already, is itself."""
    spec = profile.cards
    if spec is None or spec.base is not None:
        return (profile,)
    counts = sorted(n for n in spec.counts if only is None or n in only)
    return tuple(_variant(profile, spec, n) for n in counts)


def _variant(p: Profile, spec: CardsSpec, n: int) -> Profile:
    return dataclasses.replace(
        p,
        name=variant_name(p.name, n),
        description=f"{p.description} [card axis: {n} of {max(spec.counts)}]",
        engine=_engine_for(spec.template or p.engine, spec, n),
        hardware=dataclasses.replace(p.hardware, count=n),
        cards=dataclasses.replace(spec, base=p.name),
    )


def parse_counts(text: str) -> tuple[int, ...]:
    """`--cards 1,2` as counts; a ProfileError saying what to write otherwise."""
    parts = [t.strip() for t in text.split(",")]
    try:
        counts = tuple(int(t) for t in parts)
    except ValueError:
        raise ProfileError(
            f"--cards {text!r}: give whole card counts separated by commas, e.g. --cards 1,2"
        ) from None
    if any(n < 1 for n in counts):
        raise ProfileError(f"--cards {text!r}: every card count must be >= 1")
    if len(set(counts)) != len(counts):
        raise ProfileError(f"--cards {text!r}: list each card count once")
    return counts


def expand_all(
    profiles: Sequence[Profile], only: Collection[int] | None = None
) -> tuple[Profile, ...]:
    """Every selected profile with its axis expanded (`only`: `--cards`). A `--cards` count
    that a profile's axis lacks is an error naming the axis, not a silent omission."""
    if only is not None:
        axes = [p for p in profiles if p.cards is not None and p.cards.base is None]
        if not axes:
            names = ", ".join(p.name for p in profiles) or "(none)"
            raise ProfileError(
                f"--cards applies to profiles with a [cards] table; none of {names} has one"
            )
        for p in axes:
            assert p.cards is not None
            lacking = sorted(set(only) - set(p.cards.counts))
            if lacking:
                raise ProfileError(
                    f"--cards {','.join(map(str, only))}: profile {p.name!r} has no "
                    f"{lacking[0]}-card variant (its cards.counts: "
                    f"{', '.join(map(str, p.cards.counts))})"
                )
    out = [v for p in profiles for v in expand(p, only)]
    seen: set[str] = set()
    for v in out:
        if v.name in seen:
            raise ProfileError(f"target {v.name!r} is selected twice; select it once")
        seen.add(v.name)
    return tuple(out)


# --------------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class Scaled:
    """One scaling figure of a variant, or why it could not be computed (`figure` None:
    never a 0)."""

    profile: str  # the variant's name
    metric: str
    figure: Figure | None
    reason: str | None = None


def _sources(figures: Sequence[Figure]) -> dict[int, Figure]:
    out: dict[int, Figure] = {}
    for f in figures:
        c = f.shape.concurrency
        if f.metric == SOURCE.format(c=c):
            out.setdefault(c, f)
    return out


def _notes(metric: str, runs: Sequence[float], derived: str, *inputs: Figure) -> tuple[str, ...]:
    # certify pulls in scipy: only when figures are derived, not on every profile load.
    from servelab.certify import figure_validity, invalid_note, support_note

    n = sum(1 for v in runs if math.isfinite(v))
    validity = figure_validity(metric, samples=n)
    why = list(validity.reasons)
    # An input's INVALID reasons are that figure's (named, not copied): `servelab verify`
    # checks a copied "needs at least 3 runs" against this figure's own runs.
    why += [
        f"its input {f.metric} of {f.identity.profile} is INVALID (see that figure's notes)"
        for f in inputs
        if invalid_note(f.notes)
    ]
    state = "INVALID: " + "; ".join(why) if why else "VALID"
    return (state, support_note(n, 0, None, 50.0), derived)


def scaling_figures(base: str, by_count: Mapping[int, Sequence[Figure]]) -> list[Scaled]:
    """Throughput per card for every variant and scaling efficiency for every variant of
    more than one card, per concurrency level, from the figures each variant measured
    (`by_count`: card count -> its figures).

    Per run: throughput per card = output throughput / N; efficiency = output throughput at
    N / (N x the median over runs of output throughput at 1 card). Without a 1-card figure
    of the same level and shape, the efficiency is None with the reason."""
    out: list[Scaled] = []
    one = variant_name(base, 1)
    ones = _sources(by_count.get(1, ()))
    for n in sorted(by_count):
        for c, src in sorted(_sources(by_count[n]).items()):
            name = src.identity.profile
            per_card = tuple(v / n for v in src.runs)
            how = f"derived per run: {src.metric} of {name} / {n} card(s)"
            out.append(
                Scaled(
                    name,
                    PER_CARD.format(c=c),
                    metric_spec(PER_CARD).figure(
                        per_card,
                        shape=src.shape,
                        identity=src.identity,
                        warm=src.warm,
                        notes=_notes(PER_CARD.format(c=c), per_card, how, src),
                        c=c,
                        n=n,
                    ),
                )
            )
            if n != 1:
                ran = None if 1 not in by_count else bool(by_count[1])
                out.append(_efficiency(src, n, c, ones.get(c), one, ran))
    return out


def _efficiency(
    src: Figure, n: int, c: int, ref: Figure | None, one: str, ran: bool | None
) -> Scaled:
    """`ran`: None without a 1-card variant in the session, False when it measured nothing."""
    name = src.identity.profile
    metric = EFFICIENCY.format(c=c)
    reason = None
    if ref is None and ran is None:
        reason = (
            f"no 1-card variant in this session: efficiency needs {one} (declare 1 in "
            f"cards.counts and select it, e.g. --cards 1,{n})"
        )
    elif ref is None:
        reason = (
            f"the 1-card variant {one} measured no {src.metric} in this session"
            if ran
            else f"the 1-card variant {one} measured nothing in this session (skipped or failed)"
        )
    elif ref.shape != src.shape:
        reason = (
            f"{one} measured {src.metric} at {ref.shape.describe()}, {name} at "
            f"{src.shape.describe()}: not the same shape"
        )
    elif ref.value is None or not ref.value > 0:
        reason = f"{one}'s {src.metric} has no positive finite run (value {ref.value})"
    if reason is not None or ref is None or ref.value is None:
        return Scaled(name, metric, None, reason)
    runs = tuple(v / (n * ref.value) for v in src.runs)
    how = (
        f"derived per run: {src.metric} of {name} / ({n} x {ref.value:.6g} {src.unit}, the "
        f"median of {len(ref.runs)} run(s) of {one}); the 1-card side enters as its median, "
        "so its run-to-run spread is not in these runs"
    )
    notes = _notes(metric, runs, how, src, ref)
    above = [v for v in runs if math.isfinite(v) and v > 1.0]
    if above:
        notes += (
            f"above 1 in {len(above)} of {len(runs)} run(s) (up to {max(above):.3g}): "
            "superlinear scaling (more KV cache per sequence, a 1-card run short of memory) "
            "or noise; kept as measured, not capped",
        )
    figure = metric_spec(EFFICIENCY).figure(
        runs, shape=src.shape, identity=src.identity, warm=src.warm, notes=notes, c=c, n=n
    )
    return Scaled(name, metric, figure)


def session_scaling(profiles: Sequence[Profile], figures: Sequence[Figure]) -> list[Scaled]:
    """The scaling figures of every card axis among `profiles` (the session's expanded
    targets), from the session's `figures` (under xdist: the controller's merged ones)."""
    variants: dict[str, dict[int, str]] = {}
    for p in profiles:
        if p.cards is not None and p.cards.base is not None:
            variants.setdefault(p.cards.base, {})[p.hardware.count] = p.name
    out: list[Scaled] = []
    for base, names in variants.items():
        by_count = {
            n: [f for f in figures if f.identity.profile == name] for n, name in names.items()
        }
        out += scaling_figures(base, by_count)
    return out
