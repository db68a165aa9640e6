"""pytest-xdist: what the processes of one session share, and the one record made from them.

The controller (the process you started) makes a shared folder and hands its path to every
worker (`workerinput`). Workers share each target's server through it (`servelab.pool`),
run each target's quality gate once (`run_once`, `SessionGates`) and save what they
measured there after every test (`SessionPart`, `write_part`). At session end the controller
merges those parts (`gather_workers`), judges the figures, and the plugin writes the
session's one record and prints the same summary as a run without xdist.

Without xdist none of this runs: `shared_folder` is None and the gate simply runs.

The heavier modules (pool, quality, records) are imported where they are used, so loading
the plugin stays cheap for runs that never measure anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from servelab.errors import QualityGateError, RecordError, ServelabError
from servelab.figures import Figure

if TYPE_CHECKING:
    from servelab.quality import GateReport, LabRecords

# ------------------------------------------------------------- controller and workers

SHARED_KEY = pytest.StashKey[Path]()


class _Controller:
    """Hands the controller's shared server folder to every xdist worker."""

    def __init__(self, shared_dir: Path) -> None:
        self.shared_dir = shared_dir

    def pytest_configure_node(self, node: object) -> None:
        node.workerinput["servelab_shared_dir"] = str(self.shared_dir)  # type: ignore[attr-defined]


def start_controller(config: pytest.Config) -> None:
    """On the controller of an xdist run: make the shared folder and hand it to the workers."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.getoption("dist", "no") == "no":
        return
    shared = Path(tempfile.mkdtemp(prefix="servelab-servers-"))
    config.stash[SHARED_KEY] = shared
    config.pluginmanager.register(_Controller(shared), "servelab-xdist-controller")


def stop_controller(config: pytest.Config) -> None:
    """On the controller: stop every shared server and remove the shared folder."""
    from servelab.pool import stop_shared

    shared = config.stash.get(SHARED_KEY, None)
    if shared is not None:
        try:
            stop_shared(shared)
        finally:
            shutil.rmtree(shared, ignore_errors=True)


def shared_folder(config: pytest.Config) -> Path | None:
    """The session's shared folder under xdist (controller and workers); None otherwise."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        shared = workerinput.get("servelab_shared_dir")
        return Path(shared) if shared else None
    return config.stash.get(SHARED_KEY, None)


# ------------------------------------------------------------- files in the shared folder


def _file_name(kind: str, key: str) -> str:
    # Readable, safe in a file name, and distinct for keys that differ only in odd characters.
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}-{digest}.json"


def run_once(shared_dir: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()` in the first process of the session that asks for `key`; every later one
    gets its saved result (JSON data). The key's lock is held while computing, so a second
    process waits for the first one's result instead of computing its own. If `compute`
    raises, nothing is saved and the next process to ask computes it."""
    from filelock import FileLock

    from servelab.pool import read_state, write_state

    shared_dir.mkdir(parents=True, exist_ok=True)
    path = shared_dir / _file_name("once", key)
    with FileLock(str(path) + ".lock"):
        saved = read_state(path)
        if saved is not None:
            return saved
        result = compute()
        write_state(path, result)
        return result


def write_part(shared_dir: Path, worker: str, data: Mapping[str, Any]) -> None:
    """Save (atomically replace) one worker's results so far; called after every test, so a
    worker that dies mid-session still leaves what it measured until then."""
    from servelab.pool import write_state

    shared_dir.mkdir(parents=True, exist_ok=True)
    write_state(shared_dir / _file_name("part", worker), dict(data))


def read_parts(shared_dir: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every worker's saved results (None where a file cannot be read), by worker name."""
    from servelab.pool import read_state

    return [(p, read_state(p)) for p in sorted(shared_dir.glob("part-*.json"), key=_natural)]


def _natural(path: Path) -> list[tuple[int, str]]:
    # gw2 before gw10
    return [(int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", path.name)]


# ------------------------------------------------------------- one quality gate per target


class SessionGates:
    """Runs each target's gate once per session, also under pytest-xdist: the
    `servelab.quality.SharedGates` that the `servelab_gates` fixture gives.

    Without a shared folder it just runs the gate. With the controller's folder, the first
    worker to need a target's gate runs it under that target's lock and saves the outcome;
    the others wait and reuse it: the same report, passed or failed with its reasons, or the
    same error where the gate could not run.
    """

    def __init__(self, shared_dir: Path | None) -> None:
        self.shared_dir = shared_dir

    def run(self, target: str, gate: Callable[[], GateReport]) -> GateReport:
        if self.shared_dir is None:
            return gate()
        here: list[GateReport | ServelabError] = []

        def attempt() -> dict[str, Any]:
            try:
                report = gate()
            except ServelabError as exc:
                here.append(exc)
                return {"error": str(exc)}
            here.append(report)
            return {"report": report.to_dict()}

        saved = run_once(self.shared_dir, f"quality-gate-{target}", attempt)
        if here:  # this process ran it: its own report or exception, unchanged
            if isinstance(here[0], ServelabError):
                raise here[0]
            return here[0]
        if "error" in saved:
            raise QualityGateError(str(saved["error"]))
        return gate_report_from_dict(saved["report"])


def gate_report_from_dict(d: Mapping[str, Any]) -> GateReport:
    """The report `GateReport.to_dict` wrote (another process of the session ran the gate)."""
    from servelab.quality import CheckResult, GateReport, Outcome

    try:
        checks = tuple(
            CheckResult(
                str(c["name"]),
                bool(c["passed"]),
                str(c["summary"]),
                tuple(c["problems"]),
                tuple(Outcome(**o) for o in c["outcomes"]),
            )
            for c in d["checks"]
        )
        return GateReport(
            str(d["target"]),
            d["quality_file"],
            d["quality_file_sha256"],
            int(d["seed"]),
            checks,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise QualityGateError(f"saved quality gate report is malformed ({exc!r})") from None


def adopt_lab(lab: LabRecords, data: Mapping[str, Any]) -> None:
    """Take the gate and patch reports from another process's `LabRecords.to_dict` (the
    workers of a pytest-xdist session), so that `lab`'s summary shows them too."""
    from servelab.patches import FileStatus, PatchReport, PatchStatus

    try:
        for target, gate in data.get("gates", {}).items():
            lab.gates.setdefault(target, gate_report_from_dict(gate))
        for target, rep in data.get("patches", {}).items():
            if rep is not None and target not in lab.patches:
                lab.patches[target] = PatchReport(
                    str(rep["root"]),
                    tuple(
                        PatchStatus(
                            p["name"],
                            p["path"],
                            p["sha256"],
                            tuple(FileStatus(**f) for f in p["files"]),
                        )
                        for p in rep["patches"]
                    ),
                )
    except (AttributeError, KeyError, TypeError) as exc:
        raise QualityGateError(f"saved patch report is malformed ({exc!r})") from None


# ------------------------------------------------------------- each worker's results

PART_KIND = "servelab-session-part"


@dataclass(frozen=True)
class SessionPart:
    """What one process of a pytest session measured: a pytest-xdist worker's share of the
    session's one record, as data the controller reads back and merges (`merge_parts`)."""

    worker: str
    figures: tuple[Figure, ...] = ()
    startup: Mapping[str, float | None] = field(default_factory=dict)
    invalid_reasons: tuple[str, ...] = ()
    quality_checks: tuple[str, ...] = ()
    requests: tuple[Mapping[str, Any], ...] = ()
    lab: Mapping[str, Any] = field(default_factory=dict)  # LabRecords.to_dict() sections

    def to_dict(self) -> dict[str, Any]:
        from servelab.records import SCHEMA_VERSION, figure_dict, jsonable

        return {
            "schema_version": SCHEMA_VERSION,
            "kind": PART_KIND,
            "worker": self.worker,
            "figures": [figure_dict(f) for f in self.figures],
            "startup": dict(self.startup),
            "invalid_reasons": list(self.invalid_reasons),
            "quality_checks": list(self.quality_checks),
            "requests": jsonable(list(self.requests)),
            "lab": jsonable(self.lab),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionPart:
        from servelab.records import SCHEMA_VERSION, figure_from_dict

        if d.get("kind") != PART_KIND or d.get("schema_version") != SCHEMA_VERSION:
            raise RecordError(
                f"not a servelab session part of schema {SCHEMA_VERSION} "
                f"(kind {d.get('kind')!r}, schema_version {d.get('schema_version')!r})"
            )
        try:
            return cls(
                str(d["worker"]),
                tuple(figure_from_dict(f) for f in d["figures"]),
                {str(k): None if v is None else float(v) for k, v in d["startup"].items()},
                tuple(str(r) for r in d["invalid_reasons"]),
                tuple(str(q) for q in d["quality_checks"]),
                tuple(dict(r) for r in d["requests"]),
                dict(d["lab"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(
                f"session part {d.get('worker', '?')!r}: malformed ({exc!r})"
            ) from None


def merge_parts(parts: Sequence[SessionPart], worker: str = "all") -> SessionPart:
    """One session's results from its processes' parts. Figures, request rows and per-test
    lab entries are all kept, in part order; a reason or check several workers reported
    (each reuses the same gate outcome) appears once; a server's startup time comes from the
    worker that started it (the others attached to it)."""
    startup: dict[str, float | None] = {}
    lab: dict[str, Any] = {}
    for part in parts:
        for name, seconds in part.startup.items():
            if startup.get(name) is None:
                startup[name] = seconds
        for section, entries in part.lab.items():
            if isinstance(entries, Mapping) and isinstance(lab.get(section, {}), dict):
                lab.setdefault(section, {}).update(entries)
            else:
                lab[section] = entries
    return SessionPart(
        worker,
        tuple(f for p in parts for f in p.figures),
        startup,
        tuple(dict.fromkeys(r for p in parts for r in p.invalid_reasons)),
        tuple(dict.fromkeys(q for p in parts for q in p.quality_checks)),
        tuple(r for p in parts for r in p.requests),
        lab,
    )


# ------------------------------------------------------------- the plugin's session state


class SessionState(Protocol):
    """The part of the plugin's `RunState` that workers save and the controller merges."""

    figures: list[Figure]
    startup: dict[str, float | None]
    invalid_reasons: list[str]
    quality_checks: list[str]
    requests: list[dict[str, object]]
    messages: list[str]


def session_part(config: pytest.Config, state: SessionState, worker: str) -> SessionPart:
    """This process's results so far, lab section included."""
    from servelab.quality import LAB_RECORDS_KEY

    lab = config.stash.get(LAB_RECORDS_KEY, None)
    return SessionPart(
        worker,
        tuple(state.figures),
        dict(state.startup),
        tuple(state.invalid_reasons),
        tuple(state.quality_checks),
        tuple(state.requests),
        lab.to_dict() if lab is not None else {},
    )


def save_worker_part(config: pytest.Config, state: SessionState) -> bool:
    """On an xdist worker: save its results so far for the controller. False elsewhere."""
    workerinput = getattr(config, "workerinput", None)
    shared = shared_folder(config)
    if workerinput is None or shared is None:
        return False
    part = session_part(config, state, f"{workerinput.get('workerid', 'worker')}-{os.getpid()}")
    if (
        part.figures
        or part.requests
        or part.invalid_reasons
        or part.quality_checks
        or any(part.lab.values())
    ):
        write_part(shared, part.worker, part.to_dict())
    return True


def gather_workers(
    config: pytest.Config, state: SessionState, shared: Path, perf_session: Callable[[], object]
) -> dict[str, object]:
    """On the xdist controller: merge every worker's part into this session's state (and
    judge the figures here, for the summary and the record, with the session's
    `PerfSession`); returns the merged lab data."""
    from servelab.quality import LAB_RECORDS_KEY
    from servelab.records import PerfSession

    parts = [session_part(config, state, "controller")]
    for path, data in read_parts(shared):
        try:
            if data is None:
                raise RecordError("unreadable")
            parts.append(SessionPart.from_dict(data))
        except RecordError as exc:
            state.messages.append(f"servelab: worker results {path.name} lost: {exc}")
    merged = merge_parts(parts)
    state.figures = list(merged.figures)
    state.startup = dict(merged.startup)
    state.invalid_reasons = list(merged.invalid_reasons)
    state.quality_checks = list(merged.quality_checks)
    state.requests = [dict(r) for r in merged.requests]
    lab = config.stash.get(LAB_RECORDS_KEY, None)
    if lab is not None:  # for the quality gate summary
        try:
            adopt_lab(lab, merged.lab)
        except ServelabError as exc:
            state.messages.append(f"servelab: workers' quality gate results: {exc}")
    if state.figures:
        perf = perf_session()
        assert isinstance(perf, PerfSession)
        judged = {id(v.figure) for v in perf.verdicts}
        try:
            for fig in state.figures:
                if id(fig) not in judged:
                    perf.judge(fig)
        except (ServelabError, OSError) as exc:
            state.messages.append(f"servelab: could not judge the workers' figures: {exc}")
    return dict(merged.lab)
