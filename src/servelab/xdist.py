"""pytest-xdist: what the processes of one session share, and the one record made from them.

The controller (the process you started) makes a shared folder and hands its path to every
worker (`workerinput`). Workers share each target's server through it (`servelab.pool`),
run each target's quality gate once (`run_once`, `SessionGates`) and save their
`SessionResults` there after every test (`save_worker_part`). At session end the controller
merges those parts (`collect_session`): every figure was judged where it was measured and
travels with its verdict, so nothing is judged again; it stops the shared engines and takes
the post-run receipts (`stop_shared_engines`), then the plugin writes the session's one
record and prints the same summary as a run without xdist.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from servelab.errors import QualityGateError, RecordError, ServelabError
from servelab.gate_report import GateReport
from servelab.session import SessionResults

if TYPE_CHECKING:
    from servelab.profiles import Profile

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
    """On the controller, last: stop any shared server still running (normally
    `stop_shared_engines` already did, before the record) and remove the shared folder."""
    from servelab.pool import stop_shared

    shared = config.stash.get(SHARED_KEY, None)
    if shared is not None:
        try:
            stop_shared(shared)
        finally:
            shutil.rmtree(shared, ignore_errors=True)


def stop_shared_engines(
    config: pytest.Config,
    results: SessionResults,
    profiles: Sequence[Profile],
    messages: list[str],
    **receipt_kwargs: Any,
) -> None:
    """On the xdist controller, before the record is written: stop every engine the workers
    shared, each by its profile's stop policy, and put into ``results`` (merged from every
    worker) how each stopped and each target's post-run receipt (`servelab.receipts`), as
    the pool fixture does without xdist. A post-run problem or a failed stop invalidates
    the session and is shown in ``messages``. Elsewhere nothing: no shared folder."""
    from servelab.pool import stop_shared
    from servelab.receipts import post_run_into

    shared = config.stash.get(SHARED_KEY, None)
    if shared is None or hasattr(config, "workerinput"):
        return
    errors: list[str] = []
    stops = stop_shared(shared, {p.name: p for p in profiles}, errors)
    results.stops.update({name: record.to_dict() for name, record in stops.items()})
    problems = [f"engine teardown failed: {e}" for e in errors]
    problems += [
        f"post-run health check: {p}"
        for p in post_run_into(results.receipts, profiles, stops, **receipt_kwargs)
    ]
    results.invalidate(problems)
    messages += [f"servelab: {p}" for p in problems]


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
        return GateReport.from_dict(saved["report"])


# ------------------------------------------------------------- each worker's results


def save_worker_part(config: pytest.Config, results: SessionResults) -> bool:
    """On an xdist worker: save its results so far for the controller. False elsewhere."""
    workerinput = getattr(config, "workerinput", None)
    shared = shared_folder(config)
    if workerinput is None or shared is None:
        return False
    if results.has_data():
        worker = f"{workerinput.get('workerid', 'worker')}-{os.getpid()}"
        write_part(shared, worker, results.to_dict())
    return True


def collect_session(
    config: pytest.Config, results: SessionResults, messages: list[str]
) -> SessionResults:
    """On the xdist controller: this process's results merged with every worker's saved
    part (each figure already judged where it was measured); elsewhere `results` itself. A
    part that cannot be read is reported in `messages`, the rest is kept."""
    shared = shared_folder(config)
    if shared is None:
        return results
    parts = [results]
    for path, data in read_parts(shared):
        try:
            if data is None:
                raise RecordError("unreadable")
            parts.append(SessionResults.from_dict(data))
        except RecordError as exc:
            messages.append(f"servelab: worker results {path.name} lost: {exc}")
    return SessionResults.merge(parts)
