"""Judging a figure against its stored baseline, once, where it is measured.

`Judge` keeps the session's baseline store and reads each (host key, profile) baseline file
at most once; the target's fingerprint comes with the call, fixed when its server was ready.
Works without pytest (`servelab compare` and the tests use it too).
"""

from __future__ import annotations

from pathlib import Path

from servelab.baselines import Baseline, BaselineStore, Verdict, judge
from servelab.errors import BaselineError
from servelab.figures import Figure
from servelab.target import Target


class Judge:
    def __init__(self, baselines_dir: Path) -> None:
        self.store = BaselineStore(baselines_dir)
        self._baselines: dict[tuple[str, str], Baseline | BaselineError | None] = {}

    def __call__(self, figure: Figure, target: Target) -> Verdict:
        key = (target.fingerprint.host_key, figure.identity.profile)
        if key not in self._baselines:
            try:
                self._baselines[key] = self.store.load(*key)
            except BaselineError as exc:
                self._baselines[key] = exc
        base = self._baselines[key]
        if isinstance(base, BaselineError):
            return Verdict(figure, "refused", f"unusable baseline: {base}")
        return judge(figure, base, target.fingerprint, self.store.path(*key))
