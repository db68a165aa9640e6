"""The end of a perf session: write its record and, in update mode, its baselines.

Reads the session's merged `SessionResults` (figures already judged, targets already
fingerprinted) and writes; nothing here measures, judges or identifies anything again.
Works without pytest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from servelab.baselines import BaselineStore, Provenance, utc_now
from servelab.certify import invalid_note
from servelab.errors import BaselineError
from servelab.hardware import HostIdentity
from servelab.profiles import Profile
from servelab.records import build_record, session_folder, write_record
from servelab.redact import Redactor, Secret, SecretHeaders
from servelab.session import SessionInfo, SessionResults


@dataclass(frozen=True)
class Outcome:
    """What the end of the session did, for the terminal summary and the exit status."""

    lines: tuple[str, ...] = ()
    record: Path | None = None
    update_refused: bool = False
    errors: tuple[str, ...] = field(default_factory=tuple)
    # Session-level figures (card scaling) that regressed or were refused: no test owns
    # them, so the session fails with these (outside update mode).
    regressions: tuple[str, ...] = ()


def finish(
    results: SessionResults,
    info: SessionInfo,
    *,
    host: HostIdentity,
    results_dir: Path,
    baselines_dir: Path,
    redactor: Redactor,
    update: bool = False,
    logs: Sequence[Path] = (),
    label: str = "session",
    profiles: Sequence[Profile] = (),
) -> Outcome:
    """Write the record (whenever anything was measured or a gate ran) and update baselines
    when asked and allowed. First, the session-level figures of `profiles` (the session's
    targets) that need every target's figures: card scaling (`judge_scaling`)."""
    lines, regressions = judge_scaling(results, profiles, baselines_dir)
    record_path: Path | None = None
    record_sha: str | None = None
    if results.has_data():
        record = build_record(
            info,
            host,
            list(results.targets.values()),
            results.verdicts,
            lab=results.lab(),
            requests=results.requests,
        )
        folder = session_folder(results_dir, info.started_at, label)
        paths = write_record(folder, record, redactor, requests=results.requests, logs=logs)
        record_path = paths.folder
        record_sha = paths.record_sha256
        lines.append(
            f"record written: {paths.folder} (record.json, record.md, "
            f"{len(paths.claims)} claim(s), {len(results.requests)} raw request row(s))"
        )
    refused = False
    if update:
        more, refused = update_baselines(results, info, baselines_dir, redactor, record_sha)
        lines += more
    return Outcome(tuple(lines), record_path, refused, regressions=tuple(regressions))


def judge_scaling(
    results: SessionResults, profiles: Sequence[Profile], baselines_dir: Path
) -> tuple[list[str], list[str]]:
    """Issue 16 item 4: throughput per card and scaling efficiency of every card axis among
    `profiles`, from the session's (merged) figures; each judged here, once, against the
    variant's baseline like a measured figure, and added to `results` as its verdict.
    Returns the lines to show and the regressions / refusals."""
    from servelab.baselines import Verdict
    from servelab.cards import session_scaling
    from servelab.judging import Judge

    done = {(f.identity.profile, f.metric) for f in results.figures}
    scaled = [
        s for s in session_scaling(profiles, results.figures) if (s.profile, s.metric) not in done
    ]
    judge = Judge(baselines_dir, {p.name: p.limits.session_cv for p in profiles})
    lines: list[str] = []
    failed: list[str] = []
    for s in scaled:
        target = results.targets.get(s.profile)
        if s.figure is None or target is None:
            lines.append(f"[{s.profile}] {s.metric}: not computed: {s.reason or 'no target'}")
            continue
        invalid = invalid_note(s.figure.notes)
        verdict = (
            Verdict(s.figure, "inconclusive", f"not judged: {invalid}")
            if invalid
            else judge(s.figure, target)
        )
        results.verdicts.append(verdict)
        lines.append(f"{s.figure.label()}: {verdict.status}")
        if verdict.failed:
            failed.append(f"{s.figure.label()}\n{verdict.text}")
    return lines, failed


def update_baselines(
    results: SessionResults,
    info: SessionInfo,
    baselines_dir: Path,
    redactor: Redactor,
    record_sha256: str | None = None,
) -> tuple[list[str], bool]:
    """The baseline update workflow: every target's figures, or nothing with the reasons.
    Returns the lines to show and whether the update was refused (in whole or in part)."""
    why = []
    if info.invalid_reasons:
        why.append("quality gate / validity failed: " + "; ".join(info.invalid_reasons))
    if info.failed_tests:
        why.append("failed or errored tests: " + ", ".join(info.failed_tests))
    if info.interrupted:
        why.append("the session was interrupted")
    if not results.verdicts:
        why.append("nothing was measured")
    if why:
        return ["baseline update REFUSED, nothing written: " + " | ".join(why)], True
    store = BaselineStore(baselines_dir)
    lines: list[str] = []
    refused = False
    invalid = {id(f): bad for f in results.figures if (bad := invalid_note(f.notes))}
    for target in results.targets.values():
        ours = [f for f in results.figures if f.identity.profile == target.profile]
        # Issue 24: an INVALID figure never updates a baseline (its entry stays as it was).
        lines += [
            f"baseline entry kept for {f.label()}: {invalid[id(f)]}"
            for f in ours
            if id(f) in invalid
        ]
        mine = [f for f in ours if id(f) not in invalid]
        if not mine:
            continue
        prov = Provenance(
            utc_now(),
            info.servelab_commit,
            target.engine,
            target.model,
            info.by,
            redactor.text(info.command),
            record_sha256,
        )
        try:
            # The update workflow replaces a corrupt baseline, keeping it aside by name.
            res = store.update(target.profile, target.fingerprint, prov, mine, replace_corrupt=True)
        except BaselineError as exc:
            lines.append(f"baseline update REFUSED for {target.profile}: {exc}")
            refused = True
            continue
        lines.append(
            f"baseline updated: {res.path}"
            + (f" (previous kept in {res.history})" if res.history else "")
            + (f" (corrupt file kept as {res.set_aside})" if res.set_aside else "")
        )
        lines += [f"  {d}" for d in res.diff]
    return lines, refused


def session_redactor(
    api_key: Secret | str | None, envs: Sequence[Mapping[str, str]] = ()
) -> Redactor:
    """The redactor for everything a session writes: the API key given, its bearer header,
    and the credentials in the environment and the profiles' engine environments."""
    headers = [SecretHeaders.bearer(api_key)]
    return Redactor.from_sources(environ=os.environ, envs=envs, headers=headers, values=[api_key])
