"""Verdicts: one figure judged against its stored baseline.

Comparison across stacks (another host key, engine, model, argument set, profile, unit or
direction) is refused with the differing fields. The statistics are `servelab.stats`'s:
`judge` hands it the baseline's runs and this run's, nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from servelab.baselines.schema import (
    CREATE_HINT,
    Baseline,
    Fingerprint,
    MetricBaseline,
    figure_key,
)
from servelab.figures import Figure
from servelab.stats import DEFAULT_THRESHOLD, Comparison, compare_runs, session_drift

Status = Literal["regression", "improvement", "no change", "inconclusive", "no baseline", "refused"]


@dataclass(frozen=True)
class Verdict:
    figure: Figure
    status: Status
    text: str
    baseline: MetricBaseline | None = None
    comparison: Comparison | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("regression", "refused")


def judge(
    fig: Figure,
    baseline: Baseline | None,
    fingerprint: Fingerprint,
    path: Path,
    *,
    threshold: float | None = None,
    session_cv: float = 0.0,
    history: Sequence[Baseline] = (),
) -> Verdict:
    """Compare one figure with its stored baseline (refusing across fingerprints).

    The two sides come from different sessions: `session_cv` (the profile's
    `limits.session_cv`) is the between-session drift assumed a priori, pooled with the drift
    seen across `history` (earlier baselines of the same stack, `BaselineStore.history`)."""
    key = figure_key(fig)
    if baseline is None:
        return Verdict(fig, "no baseline", f"no baseline at {path}: {CREATE_HINT}")
    refused = _refusal(fig, fingerprint, baseline.profile, baseline.fingerprint, path)
    if refused is not None:
        return refused
    mb = baseline.metrics.get(key)
    if mb is None:
        return Verdict(fig, "no baseline", f"{path} has no entry {key!r}: {CREATE_HINT}")
    past = [
        old.metrics[key].runs
        for old in history
        if key in old.metrics and not old.fingerprint.differences(fingerprint)
    ]
    return _judge_runs(
        fig,
        mb,
        path,
        threshold if threshold is not None else mb.threshold,
        session_cv=session_cv,
        history=past,
    )


def judge_against_record(
    fig: Figure,
    fingerprint: Fingerprint,
    old: Sequence[Figure],
    old_fingerprint: Fingerprint | None,
    source: Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    session_cv: float = 0.0,
) -> Verdict:
    """Compare one figure with the same figure of an older record (`servelab compare A B`);
    two records are two sessions, so `session_cv` is the drift to allow for between them."""
    if old_fingerprint is None:
        return Verdict(fig, "no baseline", f"{source} has no results for {fig.identity.profile!r}")
    refused = _refusal(fig, fingerprint, fig.identity.profile, old_fingerprint, source)
    if refused is not None:
        return refused
    key = figure_key(fig)
    prev = next((f for f in old if figure_key(f) == key), None)
    if prev is None:
        return Verdict(fig, "no baseline", f"{source} has no figure {key!r}")
    return _judge_runs(
        fig,
        MetricBaseline.from_figure(prev, threshold, ""),
        source,
        threshold,
        session_cv=session_cv,
    )


def _refusal(
    fig: Figure, fingerprint: Fingerprint, profile: str, theirs: Fingerprint, path: Path
) -> Verdict | None:
    diffs = theirs.differences(fingerprint)
    if profile != fig.identity.profile:
        diffs.insert(0, f"profile: baseline {profile!r} vs this run {fig.identity.profile!r}")
    if not diffs:
        return None
    return Verdict(
        fig,
        "refused",
        f"comparison refused: {path} was measured on another stack; differing "
        f"fields: {'; '.join(diffs)}. Rerun on the baseline's stack, or "
        f"record a new baseline with --update-baselines",
    )


def _judge_runs(
    fig: Figure,
    mb: MetricBaseline,
    path: Path,
    threshold: float,
    *,
    session_cv: float = 0.0,
    history: Sequence[Sequence[float]] = (),
) -> Verdict:
    if mb.direction != fig.direction or mb.unit != fig.unit:
        return Verdict(
            fig,
            "refused",
            f"comparison refused: {path} metrics[{mb.key!r}] is {mb.unit} "
            f"({mb.direction} is better), this run is {fig.unit} ({fig.direction})",
        )
    cmp = compare(mb, fig, threshold=threshold, session_cv=session_cv, history=history)
    return Verdict(fig, cmp.outcome, cmp.describe(fig.direction), mb, cmp)


def compare(
    mb: MetricBaseline,
    fig: Figure,
    *,
    threshold: float | None = None,
    session_cv: float = 0.0,
    history: Sequence[Sequence[float]] = (),
) -> Comparison:
    """The statistical core: this figure's runs against the baseline's (servelab.stats),
    allowing for between-session drift (none without a prior and a history: today's test)."""
    drift = session_drift([*history, mb.runs], prior_cv=session_cv)
    return compare_runs(
        mb.runs,
        fig.runs,
        fig.direction,
        threshold=threshold if threshold is not None else mb.threshold,
        session_cv=drift.cv,
        session_df=drift.df,
    )
