"""Card count as a variable (issue 16 item 4): the `[cards]` axis's expansion into targets and
the scaling figures derived from the variants' concurrency figures.

The per-variant figures come from tests/data/cards/stand-in-runs.json: recorded stand-ins
written by hand (the lab's B70 scaling figures are not in this repository), not measurements.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from servelab.baselines import Verdict
from servelab.cards import (
    EFFICIENCY,
    PER_CARD,
    Scaled,
    device_list,
    expand,
    expand_all,
    fill_axis,
    parse_counts,
    scaling_figures,
    session_scaling,
    variant_name,
)
from servelab.catalogue import spec
from servelab.errors import ProfileError
from servelab.figures import Figure, Identity, Shape
from servelab.finish import finish, judge_scaling, update_baselines
from servelab.profiles import Profile, load_profile
from servelab.redact import Redactor
from servelab.session import SessionInfo, SessionResults
from servelab.target import make_target
from tests.fakes.hosts import TEST_HOST

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "fixtures" / "profiles"
CARDS = PROFILES / "gemma4-12b-cards.toml"
STAND_IN = ROOT / "tests" / "data" / "cards" / "stand-in-runs.json"
SESSION = SessionInfo(1764990000.0, 1764990100.0, "pytest -m perf", 0, False, "abc123", "lab")


def cards_profile() -> Profile:
    return load_profile(CARDS)


def argv_of(p: Profile) -> list[str]:
    return p.render_command(model="/models/g", port=18080, python="py")


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --------------------------------------------------------------------------- expansion


def test_the_axis_expands_into_named_variants_fewest_cards_first() -> None:
    variants = expand(cards_profile())
    assert [v.name for v in variants] == [
        "gemma4-12b-cards@1card",
        "gemma4-12b-cards@2cards",
        "gemma4-12b-cards@4cards",
    ]
    assert [v.hardware.count for v in variants] == [1, 2, 4]
    for v in variants:
        assert v.cards is not None and v.cards.base == "gemma4-12b-cards"
        assert "/" not in v.name and not v.name.startswith(".")  # a baseline path component
        assert f"card axis: {v.hardware.count} of 4" in v.description


@pytest.mark.parametrize(
    ("n", "devices"), [(1, "0"), (2, "0,1"), (4, "0,1,2,3")], ids=["1card", "2cards", "4cards"]
)
def test_each_variant_renders_its_tp_flag_and_device_environment(n: int, devices: str) -> None:
    v = next(x for x in expand(cards_profile()) if x.hardware.count == n)
    argv = argv_of(v)
    assert flag(argv, "--tensor-parallel-size") == str(n)
    assert flag(argv, "--pipeline-parallel-size") == "1"
    assert v.engine.env["ONEAPI_DEVICE_SELECTOR"] == f"level_zero:{devices}"
    assert v.engine.env["ZE_AFFINITY_MASK"] == devices
    assert v.engine.env["VLLM_CACHE_ROOT"].endswith(f"-c8-slot-tp{n}")
    leftovers = [a for a in [*argv, *v.engine.env.values()] if "{cards}" in a or "{devices}" in a]
    assert not leftovers
    # Doubled braces survive the axis and render to the lab's JSON.
    assert '{"image":4}' in argv


def test_variants_differ_in_args_hash_and_the_largest_is_the_c8_slot() -> None:
    variants = expand(cards_profile())
    assert len({v.args_hash() for v in variants}) == 3
    c8 = load_profile(PROFILES / "gemma4-12b-c8.toml")
    four = variants[-1]
    assert argv_of(four) == argv_of(c8)  # flag for flag the lab's TP4 slot
    differ = {k for k in c8.engine.env if c8.engine.env[k] != four.engine.env.get(k)}
    assert differ == {"VLLM_CACHE_ROOT"}  # its own compile cache per count
    # Loaded, the profile is its largest variant (renders and hashes like any profile).
    base = cards_profile()
    assert argv_of(base) == argv_of(four) and base.args_hash() == four.args_hash()
    assert base.hardware.count == 4


def test_a_profile_without_an_axis_and_a_variant_expand_to_themselves() -> None:
    c8 = load_profile(PROFILES / "gemma4-12b-c8.toml")
    assert expand(c8) == (c8,)
    two = expand(cards_profile())[1]
    assert expand(two) == (two,)


def test_cards_option_selects_a_subset_and_keeps_other_profiles() -> None:
    c8 = load_profile(PROFILES / "gemma4-12b-c8.toml")
    out = expand_all([cards_profile(), c8], parse_counts("2,1"))
    assert [p.name for p in out] == [
        "gemma4-12b-cards@1card",
        "gemma4-12b-cards@2cards",
        "gemma4-12b-c8",
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "must be >= 1"),
        ("1,1", "each card count once"),
        ("1,x", "whole card counts"),
        ("", "whole card counts"),
    ],
)
def test_bad_cards_option_says_what_to_write(text: str, why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        parse_counts(text)


def test_cards_option_errors_name_the_axis() -> None:
    with pytest.raises(ProfileError, match=r"no 3-card variant \(its cards.counts: 1, 2, 4\)"):
        expand_all([cards_profile()], (1, 3))
    c8 = load_profile(PROFILES / "gemma4-12b-c8.toml")
    with pytest.raises(ProfileError, match="none of gemma4-12b-c8 has one"):
        expand_all([c8], (1,))
    with pytest.raises(ProfileError, match="selected twice"):
        expand_all([c8, c8])


def test_fill_axis_fills_only_the_axis() -> None:
    values = {"cards": "2", "devices": "0,1"}
    assert fill_axis("--tp={cards}", values) == "--tp=2"
    assert fill_axis('{{"tp":{cards}}}', values) == '{{"tp":2}}'
    assert fill_axis("{model}:{port}", values) == "{model}:{port}"
    assert fill_axis("{cards:>3}", values) == "  2"
    assert device_list(None, 3) == "0,1,2"


def _variant_file(tmp_path: Path, replace: dict[str, str]) -> Path:
    text = CARDS.read_text().replace('name = "gemma4-12b-cards"', 'name = "mine"')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


AXIS = "counts = [1, 2, 4]"


@pytest.mark.parametrize(
    ("replace", "why"),
    [
        ({AXIS: "counts = []"}, r"'cards.counts' is empty"),
        ({AXIS: "counts = [0, 1, 4]"}, r"has 0: every card count must be >= 1"),
        ({AXIS: "counts = [1, 2, 2, 4]"}, r"lists 2 more than once"),
        ({AXIS: "counts = [1, 2]"}, r"'hardware.count' is 4 but must equal the largest"),
        ({'devices = ["0", "1", "2", "3"]': 'devices = ["0", "1"]'}, r"names 2 device"),
        ({'devices = ["0", "1", "2", "3"]': 'devices = ["0", "0", "1", "2"]'}, r"distinct ids"),
        ({AXIS: 'counts = ["two"]'}, r"cards\.counts"),
        ({'accelerator = "xpu"': 'accelerator = "cpu"'}, r"needs an accelerator"),
        ({"[cards]\n": "[nocards]\n"}, r"nocards"),
    ],
)
def test_bad_axes_are_refused_on_load(tmp_path: Path, replace: dict[str, str], why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        load_profile(_variant_file(tmp_path, replace))


def test_axis_placeholders_need_a_cards_table(tmp_path: Path) -> None:
    text = CARDS.read_text().replace('name = "gemma4-12b-cards"', 'name = "mine"')
    text = text[: text.index("\n[cards]\n")] + text[text.index("\n[readiness]\n") :]
    (tmp_path / "mine.toml").write_text(text)
    with pytest.raises(ProfileError, match=r"uses \{cards\} or \{devices\}.*add one"):
        load_profile(tmp_path / "mine.toml")
    env_only = CARDS.read_text().replace('name = "gemma4-12b-cards"', 'name = "other"')
    env_only = env_only.replace('"{cards}",', '"4",').replace("-tp{cards}", "")
    cut = env_only.index("\n[cards]\n"), env_only.index("\n[readiness]\n")
    env_only = env_only[: cut[0]] + env_only[cut[1] :]
    (tmp_path / "other.toml").write_text(env_only)
    with pytest.raises(ProfileError, match=r"ONEAPI_DEVICE_SELECTOR=level_zero:\{devices\}"):
        load_profile(tmp_path / "other.toml")


# --------------------------------------------------------------------------- scaling


def stand_in() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(STAND_IN.read_text())
    return data


def identity(n: int) -> Identity:
    d = stand_in()
    return Identity(variant_name(d["profile"], n), d["engine"], d["host"], d["model"])


def source(n: int, c: int, runs: tuple[float, ...], notes: tuple[str, ...] = ("VALID",)) -> Figure:
    d = stand_in()
    return spec("output_throughput_c{c}").figure(
        runs,
        shape=Shape(d["prompt_tokens"], d["output_tokens"], concurrency=c),
        identity=identity(n),
        notes=notes,
        c=c,
    )


def recorded() -> dict[int, list[Figure]]:
    """The stand-in runs as each variant's concurrency figures."""
    levels = stand_in()["output_throughput"]
    return {
        int(n): [source(int(n), int(c), tuple(runs)) for c, runs in by_c.items()]
        for n, by_c in levels.items()
    }


def by_metric(scaled: list[Scaled]) -> dict[tuple[str, str], Scaled]:
    return {(s.profile, s.metric): s for s in scaled}


def test_throughput_per_card_and_efficiency_from_recorded_runs() -> None:
    levels = stand_in()["output_throughput"]
    out = by_metric(scaling_figures("gemma4-12b-cards", recorded()))
    # Per card for every variant and level; efficiency for 2 and 4 cards only.
    assert len(out) == 3 * 2 + 2 * 2
    for n in (1, 2, 4):
        for c in (1, 8):
            s = out[(variant_name("gemma4-12b-cards", n), f"output_tok_s_per_card_c{c}")]
            assert s.figure is not None and s.reason is None
            assert s.figure.runs == pytest.approx([v / n for v in levels[str(n)][str(c)]])
            assert s.figure.unit == "tok/s/card" and s.figure.direction == "higher"
            assert s.figure.shape == Shape(119, 512, concurrency=c)
            assert s.figure.identity == identity(n)
            assert f"{n}-card variant" in s.figure.title
    one_c8 = 258.0  # median of the 1-card c8 runs
    s = out[("gemma4-12b-cards@4cards", "scaling_efficiency_c8")]
    assert s.figure is not None
    assert s.figure.runs == pytest.approx(
        [690 / (4 * one_c8), 705 / (4 * one_c8), 698 / (4 * one_c8)]
    )
    assert s.figure.value == pytest.approx(698 / (4 * one_c8))  # 0.676
    assert s.figure.unit == "ratio" and "4 cards vs 1" in s.figure.title
    assert s.figure.notes[0] == "VALID"
    assert any("the median of 3 run(s) of gemma4-12b-cards@1card" in x for x in s.figure.notes)
    assert "scaling efficiency at concurrency 8, 4 cards vs 1 [scaling_efficiency_c8] = 0.6764" in (
        s.figure.label()
    )
    two_c1 = out[("gemma4-12b-cards@2cards", "scaling_efficiency_c1")].figure
    assert two_c1 is not None and two_c1.value == pytest.approx(59.4 / (2 * 42.0))
    assert ("gemma4-12b-cards@1card", "scaling_efficiency_c1") not in out


def test_efficiency_above_one_is_kept_and_said() -> None:
    figs = {1: [source(1, 8, (200.0, 204.0, 202.0))], 2: [source(2, 8, (430.0, 441.0, 436.0))]}
    s = by_metric(scaling_figures("gemma4-12b-cards", figs))[
        ("gemma4-12b-cards@2cards", "scaling_efficiency_c8")
    ]
    assert s.figure is not None and s.figure.value == pytest.approx(436 / 404)
    assert (s.figure.value or 0.0) > 1  # not capped
    assert any(x.startswith("above 1 in 3 of 3 run(s)") for x in s.figure.notes)


def test_missing_one_card_reference_is_none_with_a_reason_never_zero() -> None:
    d = recorded()
    no_one = by_metric(scaling_figures("gemma4-12b-cards", {2: d[2], 4: d[4]}))
    s = no_one[("gemma4-12b-cards@4cards", "scaling_efficiency_c8")]
    assert s.figure is None
    assert s.reason is not None and "no 1-card variant in this session" in s.reason
    assert "--cards 1,4" in s.reason
    # Per card needs no reference.
    assert no_one[("gemma4-12b-cards@4cards", "output_tok_s_per_card_c8")].figure is not None
    # The 1-card variant ran, but not this level.
    only_c1 = [f for f in d[1] if f.shape.concurrency == 1]
    s = by_metric(scaling_figures("gemma4-12b-cards", {1: only_c1, 2: d[2]}))[
        ("gemma4-12b-cards@2cards", "scaling_efficiency_c8")
    ]
    assert s.figure is None and s.reason is not None
    assert "gemma4-12b-cards@1card measured no output_throughput_c8" in s.reason
    # The 1-card figure has no finite run.
    nan = float("nan")
    s = by_metric(
        scaling_figures("gemma4-12b-cards", {1: [source(1, 8, (nan, nan, nan))], 2: d[2]})
    )[("gemma4-12b-cards@2cards", "scaling_efficiency_c8")]
    assert s.figure is None and s.reason is not None and "no positive finite run" in s.reason


def test_another_shape_at_one_card_is_not_a_reference() -> None:
    d = recorded()
    other = spec("output_throughput_c{c}").figure(
        (255.0, 262.0, 258.0), shape=Shape(32, 32, concurrency=8), identity=identity(1), c=8
    )
    s = by_metric(scaling_figures("gemma4-12b-cards", {1: [other], 2: d[2]}))[
        ("gemma4-12b-cards@2cards", "scaling_efficiency_c8")
    ]
    assert s.figure is None and s.reason is not None and "not the same shape" in s.reason


def test_a_missing_run_stays_missing_and_invalid_inputs_make_invalid_figures() -> None:
    nan = float("nan")
    figs = {
        1: [source(1, 8, (255.0, 262.0, 258.0), ("INVALID: output_throughput_c8: too short",))],
        2: [source(2, 8, (430.0, nan, 436.0))],
    }
    out = by_metric(scaling_figures("gemma4-12b-cards", figs))
    per_card = out[("gemma4-12b-cards@2cards", "output_tok_s_per_card_c8")].figure
    assert per_card is not None and math.isnan(per_card.runs[1])  # never 0
    # Two finite runs: a median over runs needs 3 for a verdict.
    assert per_card.notes[0].startswith("INVALID") and "N = 2 run(s)" in per_card.notes[0]
    eff = out[("gemma4-12b-cards@2cards", "scaling_efficiency_c8")].figure
    assert eff is not None and eff.notes[0].startswith("INVALID")
    assert "output_throughput_c8 of gemma4-12b-cards@1card is INVALID" in eff.notes[0]
    one = out[("gemma4-12b-cards@1card", "output_tok_s_per_card_c8")].figure
    assert one is not None and "of gemma4-12b-cards@1card is INVALID (see" in one.notes[0]


def test_an_input_too_short_for_a_verdict_does_not_make_a_forged_invalid() -> None:
    """The 1-card reference had 2 runs; the 2-card efficiency has 3 of its own: its INVALID
    note names the input without claiming its own runs are too few (`servelab verify`)."""
    from servelab.records import figure_dict
    from servelab.verify import check_not_judged

    short = "INVALID: output_throughput_c8: N = 2 run(s), a verdict needs at least 3"
    figs = {1: [source(1, 8, (255.0, 262.0), (short,))], 2: [source(2, 8, (430.0, 441.0, 436.0))]}
    eff = by_metric(scaling_figures("gemma4-12b-cards", figs))[
        ("gemma4-12b-cards@2cards", "scaling_efficiency_c8")
    ].figure
    assert eff is not None and eff.notes[0].startswith("INVALID")
    assert "a verdict needs at least" not in eff.notes[0]
    check = check_not_judged("here", figure_dict(eff), {"text": f"not judged: {eff.notes[0]}"})
    assert check.status == "ok", check


def test_other_figures_are_not_sources() -> None:
    tpot = spec("median_tpot_ms_c{c}").figure(
        (20.0, 21.0, 20.5), shape=Shape(119, 512, 8), identity=identity(2), c=8
    )
    assert scaling_figures("gemma4-12b-cards", {1: [], 2: [tpot]}) == []
    assert PER_CARD.format(c=8) == "output_tok_s_per_card_c8"
    assert EFFICIENCY.format(c=8) == "scaling_efficiency_c8"


def test_session_scaling_groups_the_variants_of_each_axis() -> None:
    variants = expand(cards_profile())
    c8 = load_profile(PROFILES / "gemma4-12b-c8.toml")
    figures = [f for figs in recorded().values() for f in figs]
    stray = source(4, 8, (1.0, 1.0, 1.0))
    stray = Figure(**{**stray.__dict__, "identity": Identity("gemma4-12b-c8", "e", "h", "m")})
    out = session_scaling([*variants, c8], [*figures, stray])
    assert {s.profile for s in out} == {v.name for v in variants}
    assert len(out) == 10


# --------------------------------------------------------------------------- end of session


def session_results(figures: list[Figure]) -> SessionResults:
    targets = {f.identity.profile: make_target(f.identity, None, TEST_HOST) for f in figures}
    return SessionResults(
        targets=targets, verdicts=[Verdict(f, "no baseline", "") for f in figures]
    )


def host_figures(runs: dict[int, tuple[float, ...]]) -> list[Figure]:
    out = []
    for n, values in runs.items():
        f = source(n, 8, values)
        ident = Identity(f.identity.profile, f.identity.engine, TEST_HOST.key, f.identity.model)
        out.append(Figure(**{**f.__dict__, "identity": ident}))
    return out


def test_scaling_is_judged_against_baselines_and_a_drop_fails_the_session(
    tmp_path: Path,
) -> None:
    profiles = expand(cards_profile(), (1, 2))
    first = session_results(host_figures({1: (255.0, 262.0, 258.0), 2: (430.0, 441.0, 436.0)}))
    lines, failed = judge_scaling(first, profiles, tmp_path)
    assert not failed
    derived = [
        v for v in first.verdicts if "card" in v.figure.metric or "scaling" in v.figure.metric
    ]
    assert sorted(v.figure.metric for v in derived) == [
        "output_tok_s_per_card_c8",
        "output_tok_s_per_card_c8",
        "scaling_efficiency_c8",
    ]
    assert all(v.status == "no baseline" for v in derived)
    assert any("scaling_efficiency_c8" in x and x.endswith(": no baseline") for x in lines)
    # Judged once: a second call adds nothing.
    assert judge_scaling(first, profiles, tmp_path) == ([], [])
    more, refused = update_baselines(first, SESSION, tmp_path, Redactor(frozenset()))
    assert not refused, more
    # The 2-card variant lost a quarter of its throughput: efficiency and per card regress.
    second = session_results(host_figures({1: (256.0, 260.0, 259.0), 2: (327.0, 331.0, 329.0)}))
    lines, failed = judge_scaling(second, profiles, tmp_path)
    statuses = {
        (v.figure.identity.profile, v.figure.metric): v.status
        for v in second.verdicts
        if "card" in v.figure.metric or "scaling" in v.figure.metric
    }
    assert statuses[("gemma4-12b-cards@2cards", "scaling_efficiency_c8")] == "regression"
    assert statuses[("gemma4-12b-cards@2cards", "output_tok_s_per_card_c8")] == "regression"
    # Unchanged at 1 card (3 runs a side: "no change" or "inconclusive", never a failure).
    one = statuses[("gemma4-12b-cards@1card", "output_tok_s_per_card_c8")]
    assert one in ("no change", "inconclusive")
    assert len(failed) == 2 and any("scaling_efficiency_c8" in x for x in failed)


@pytest.mark.parametrize(
    ("counts", "why"),
    [
        ((2,), "no 1-card variant in this session"),
        ((1, 2), "the 1-card variant gemma4-12b-cards@1card measured nothing"),
    ],
    ids=["not-selected", "skipped"],
)
def test_missing_reference_is_a_line_not_a_figure(
    tmp_path: Path, counts: tuple[int, ...], why: str
) -> None:
    profiles = expand(cards_profile(), counts)
    res = session_results(host_figures({2: (430.0, 441.0, 436.0)}))
    lines, failed = judge_scaling(res, profiles, tmp_path)
    assert not failed
    assert not any(v.figure.metric.startswith("scaling") for v in res.verdicts)
    assert any(
        f"[gemma4-12b-cards@2cards] scaling_efficiency_c8: not computed: {why}" in x for x in lines
    ), lines


def test_the_record_carries_the_scaling_figures(tmp_path: Path) -> None:
    profiles = expand(cards_profile(), (1, 2))
    res = session_results(host_figures({1: (255.0, 262.0, 258.0), 2: (430.0, 441.0, 436.0)}))
    out = finish(
        res,
        SESSION,
        host=TEST_HOST,
        results_dir=tmp_path / "results",
        baselines_dir=tmp_path / "baselines",
        redactor=Redactor(frozenset()),
        profiles=profiles,
    )
    assert out.record is not None and out.regressions == ()
    record = (out.record / "record.json").read_text()
    assert "scaling_efficiency_c8" in record and "output_tok_s_per_card_c8" in record
    assert (
        "scaling efficiency at concurrency 8, 2 cards vs 1"
        in (out.record / "record.md").read_text()
    )
    assert any("scaling_efficiency_c8" in x for x in out.lines)


# --------------------------------------------------------------------------- plugin

PROBE = """
def test_probe(servelab_endpoint):
    pass
"""


def test_variants_whose_cards_are_missing_skip_each_with_its_reason(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(PROBE)
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--profile", "gemma4-12b-cards", "--cards", "1,2", "-rs"
    )
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*profile 'gemma4-12b-cards@1card' needs 1x xpu*",
            "*profile 'gemma4-12b-cards@2cards' needs 2x xpu*",
        ]
    )
    assert "@4cards" not in result.stdout.str()
    logs = pytester.path / "results" / "logs"
    assert not logs.exists() or not any(logs.iterdir())  # no engine was started
    bad = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--profile", "gemma4-12b-cards", "--cards", "3"
    )
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*no 3-card variant (its cards.counts: 1, 2, 4)*"])


RECORDS = """
from servelab.catalogue import spec
from servelab.figures import Identity, Shape
from servelab.hardware import host_key

ONE = {one}
TWO = {two}

def fig(n, runs):
    name = "gemma4-12b-cards@1card" if n == 1 else f"gemma4-12b-cards@{{n}}cards"
    ident = Identity(name, "vllm 0.11.1+xpu", host_key(), "gemma4-12b-it-int4-autoround")
    return spec("output_throughput_c{{c}}").figure(
        tuple(runs), shape=Shape(119, 512, 8), identity=ident, notes=("VALID",), c=8
    )

def test_one_card(servelab_record):
    servelab_record(fig(1, ONE))

def test_two_cards(servelab_record):
    servelab_record(fig(2, TWO))
"""


def test_the_session_judges_scaling_at_its_end_and_shows_it(pytester: pytest.Pytester) -> None:
    """Recorded stand-in figures for two variants (no engine): at the end of the session the
    scaling figures join the summary, the verdict table, the record and the baselines; a drop
    in scaling against the stored baseline fails the session (no test owns the figure)."""
    args: tuple[str, ...] = ("-p", "no:cacheprovider", "--results-dir", "res")
    args += ("--baselines-dir", "base", "--profile", "gemma4-12b-cards", "--cards", "1,2")
    pytester.makepyfile(RECORDS.format(one="[255.0, 262.0, 258.0]", two="[430.0, 441.0, 436.0]"))
    first = pytester.runpytest_inprocess(*args, "--update-baselines")
    first.assert_outcomes(passed=2)
    assert first.ret == pytest.ExitCode.OK
    first.stdout.fnmatch_lines(
        [
            "*servelab figures*",
            "scaling efficiency at concurrency 8, 2 cards vs 1 ?scaling_efficiency_c8? = 0.845*",
            "*servelab verdicts*",
            "*scaling_efficiency_c8*",
            "*baseline updated*gemma4-12b-cards@2cards.json*",
        ]
    )
    recs = sorted(pytester.path.glob("res/records/*/record.json"))
    assert len(recs) == 1 and "scaling_efficiency_c8" in recs[0].read_text()
    # One card got faster, two did not: each measured figure passes its test, the scaling
    # efficiency (436 / (2 x 342) = 0.64 against 0.845) regresses and fails the session.
    pytester.makepyfile(RECORDS.format(one="[340.0, 345.0, 342.0]", two="[430.0, 441.0, 436.0]"))
    second = pytester.runpytest_inprocess(*args)
    second.assert_outcomes(passed=2)
    assert second.ret == pytest.ExitCode.TESTS_FAILED
    second.stdout.fnmatch_lines(["*session figure failed: scaling efficiency at concurrency 8*"])
