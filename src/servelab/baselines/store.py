"""The baseline store: `baselines/<host key>/<profile>.json`, read and updated safely.

An update merges this run's figures into the file under a file lock, keeps the previous file
in `history/<profile>/`, and replaces the file atomically (`servelab.files`). The lock file
is `.<profile>.json.lock` beside the baseline: a hidden name that `.gitignore` ignores, so
the update workflow's pull request never carries it. A corrupt file is never overwritten:
`update` refuses it, or, asked with ``replace_corrupt=True``, moves it aside to
`<profile>.json.corrupt-<UTC stamp>` first (also ignored by git).
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from servelab.baselines.schema import (
    Baseline,
    Fingerprint,
    MetricBaseline,
    Provenance,
    figure_key,
    load_baseline,
)
from servelab.errors import BaselineError
from servelab.figures import Figure
from servelab.files import atomic_write_text, fsync_dir
from servelab.stats import DEFAULT_THRESHOLD, MIN_RUNS


@dataclass(frozen=True)
class UpdateResult:
    path: Path
    history: Path | None
    diff: tuple[str, ...]
    set_aside: Path | None = None  # where a corrupt file was moved (replace_corrupt=True)


# --------------------------------------------------------------------------- provenance


def servelab_commit() -> str:
    """servelab's git commit (`-dirty` with local changes); SERVELAB_COMMIT overrides."""
    if os.environ.get("SERVELAB_COMMIT"):
        return os.environ["SERVELAB_COMMIT"]
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def who() -> str:
    by = os.environ.get("SERVELAB_BY")
    if by:
        return by
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class BaselineStore:
    root: Path
    lock_timeout_s: float = 60.0

    def path(self, host_key: str, profile: str) -> Path:
        for part, what in ((host_key, "host key"), (profile, "profile")):
            if not part or "/" in part or part.startswith("."):
                raise BaselineError(f"invalid {what} {part!r} for a baseline path")
        return self.root / host_key / f"{profile}.json"

    def lock_path(self, host_key: str, profile: str) -> Path:
        """The update lock of one baseline file (hidden and git-ignored, never committed)."""
        path = self.path(host_key, profile)
        return path.with_name(f".{path.name}.lock")

    def load(self, host_key: str, profile: str) -> Baseline | None:
        path = self.path(host_key, profile)
        baseline = load_baseline(path)
        if baseline is not None and baseline.fingerprint.host_key != host_key:
            own = self.path(baseline.fingerprint.host_key, profile)
            raise BaselineError(
                f"{path}: field 'fingerprint.host_key' is {baseline.fingerprint.host_key!r} "
                f"but the file sits under host key {host_key!r}: it belongs to another host. "
                f"Move it to {own}, or remove it and record this host's baseline with "
                f"`./dev perf --profile {profile} --update-baselines`"
            )
        return baseline

    def history(self, host_key: str, profile: str) -> list[Baseline]:
        """The earlier baselines of (host key, profile) that the update workflow kept, oldest
        first; a file that cannot be read is skipped (it judges nothing)."""
        folder = self.path(host_key, profile).parent / "history" / profile
        out = []
        for p in sorted(folder.glob("*.json")):
            try:
                old = load_baseline(p)
            except BaselineError:
                continue
            if old is not None:
                out.append(old)
        return out

    def update(
        self,
        profile: str,
        fingerprint: Fingerprint,
        provenance: Provenance,
        figures: Sequence[Figure],
        *,
        thresholds: Mapping[str, float] | None = None,
        min_runs: int = MIN_RUNS,
        replace_corrupt: bool = False,
    ) -> UpdateResult:
        """Write `figures` as the baseline of `profile` on this host (merge under a lock).

        An unusable existing file raises BaselineError and stays as it is, unless
        `replace_corrupt`: then it is moved aside (`UpdateResult.set_aside`) and a new file
        is written from `figures` alone.
        """
        from filelock import FileLock, Timeout

        short = [
            f"{figure_key(f)} ({len(f.runs)} runs)"
            for f in figures
            if sum(math.isfinite(r) for r in f.runs) < min_runs
        ]
        if short:
            raise BaselineError(
                f"refusing to write baseline for {profile!r}: every metric needs at least "
                f"{min_runs} runs, each a fresh measurement; too few: {', '.join(short)}. "
                f"Rerun with --runs {max(min_runs, 3)} or more"
            )
        if not figures:
            raise BaselineError(f"refusing to write baseline for {profile!r}: no figures")
        path = self.path(fingerprint.host_key, profile)
        lock = self.lock_path(fingerprint.host_key, profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(lock), timeout=self.lock_timeout_s):
                return self._update_locked(
                    path,
                    profile,
                    fingerprint,
                    provenance,
                    figures,
                    thresholds or {},
                    replace_corrupt=replace_corrupt,
                )
        except Timeout:
            raise BaselineError(
                f"{path}: another process holds the update lock "
                f"{lock} for over {self.lock_timeout_s:.0f} s"
            ) from None

    def _update_locked(
        self,
        path: Path,
        profile: str,
        fingerprint: Fingerprint,
        provenance: Provenance,
        figures: Sequence[Figure],
        thresholds: Mapping[str, float],
        *,
        replace_corrupt: bool,
    ) -> UpdateResult:
        diff: list[str] = []
        aside = None
        try:
            old = self.load(fingerprint.host_key, profile)
        except BaselineError as exc:
            if not replace_corrupt:
                raise  # nothing written
            aside = set_aside(path)
            old = None
            diff.append(f"unusable baseline moved aside to {aside} ({_first_line(exc)})")
        kept: dict[str, MetricBaseline] = {}
        if old is not None:
            changes = old.fingerprint.differences(fingerprint)
            if changes:
                diff.append("stack changed; earlier metrics dropped: " + "; ".join(changes))
            else:
                kept = dict(old.metrics)
        else:
            diff.append(f"new baseline file {path}")
        for fig in figures:
            key = figure_key(fig)
            prev = kept.get(key)
            threshold = thresholds.get(fig.metric) or (
                prev.threshold if prev else DEFAULT_THRESHOLD
            )
            new = MetricBaseline.from_figure(fig, threshold, provenance.date)
            diff.append(_diff_line(key, prev, new))
            kept[key] = new
        baseline = Baseline(profile, fingerprint, provenance, kept)
        history = None
        if old is not None:
            stamp = old.provenance.date.replace(":", "").replace("-", "")
            history = path.parent / "history" / profile / f"{stamp}-{int(time.time_ns())}.json"
            atomic_write_text(history, path.read_text(encoding="utf-8"))
        atomic_write_text(path, json.dumps(baseline.to_json(), indent=2, sort_keys=True) + "\n")
        return UpdateResult(path, history, tuple(diff), aside)


def set_aside(path: Path) -> Path:
    """Rename an unusable baseline file to `<name>.corrupt-<UTC stamp>` beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.split(". ", 1)[0] if len(text) > 200 else text


def _diff_line(key: str, prev: MetricBaseline | None, new: MetricBaseline) -> str:
    med = new.summary.median
    if prev is None:
        return f"+ {key}: {med:.4g} {new.unit} (n={len(new.runs)}, new)"
    old_med = prev.summary.median
    change = f"{(med / old_med - 1) * 100:+.1f}%" if old_med else "n/a"
    return (
        f"~ {key}: {old_med:.4g} -> {med:.4g} {new.unit} ({change}; "
        f"n={len(prev.runs)} -> {len(new.runs)})"
    )
