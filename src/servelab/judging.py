"""Judging a figure against its stored baseline, once, where it is measured.

`Judge` keeps the session's baseline store and reads each (host key, profile) baseline file
at most once; the target's fingerprint comes with the call, fixed when its server was ready.
Works without pytest (`servelab compare` and the tests use it too).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from servelab.baselines import Baseline, BaselineStore, Verdict, judge
from servelab.errors import BaselineError
from servelab.figures import Figure
from servelab.target import Target


class Judge:
    """`session_cv` by profile: the between-session drift its limits assume
    (`limits.session_cv`; 0 for a profile not named there)."""

    def __init__(self, baselines_dir: Path, session_cv: Mapping[str, float] | None = None) -> None:
        self.store = BaselineStore(baselines_dir)
        self.session_cv = dict(session_cv or {})
        self._baselines: dict[tuple[str, str], Baseline | BaselineError | None] = {}
        self._history: dict[tuple[str, str], list[Baseline]] = {}

    def __call__(self, figure: Figure, target: Target) -> Verdict:
        key = (target.fingerprint.host_key, figure.identity.profile)
        if key not in self._baselines:
            try:
                self._baselines[key] = self.store.load(*key)
            except BaselineError as exc:
                self._baselines[key] = exc
            self._history[key] = self.store.history(*key)
        base = self._baselines[key]
        if isinstance(base, BaselineError):
            return Verdict(figure, "refused", f"unusable baseline: {base}")
        return judge(
            figure,
            base,
            target.fingerprint,
            self.store.path(*key),
            session_cv=self.session_cv.get(figure.identity.profile, 0.0),
            history=self._history[key],
        )
