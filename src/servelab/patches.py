"""Patched-engine check: does the installed vLLM carry a profile's patch files?

A profile's ``[patches] files`` are unified diffs (``git diff`` / ``diff -u``) against the
engine's source tree. Each one is checked **by content**: for every hunk, the post-image
(context + added lines) must be found in the installed file; a hunk whose pre-image is found
instead is "not applied"; neither is a conflict (the file changed some other way). Lines are
compared with trailing whitespace stripped, because the lab applies its patches with
``git apply --whitespace=fix``. Hunk offsets are ignored (a patch stays "applied" when
unrelated code above it moves).

Paths resolve against ``[patches] source_root`` (relative to the profile file), else the
folder that holds the installed ``vllm`` package (site-packages, or the source checkout of
an editable install, as on the lab host). ``a/`` and ``b/`` prefixes are stripped (-p1).

Every patch's SHA-256 and the SHA-256 of each file it touches, as found, go in the record;
an engine missing any patch is refused with the patch names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from servelab.errors import ServelabError

PLACEHOLDER_MARK = "servelab-placeholder:"
State = Literal["applied", "not-applied", "conflict", "missing-file"]
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ServelabError):
    """A patch file is missing, malformed or a placeholder."""


class UnpatchedEngineError(ServelabError):
    """The installed engine does not carry every patch a profile requires."""


@dataclass(frozen=True)
class Hunk:
    line: int  # line of the @@ header in the patch file
    before: tuple[str, ...]  # context + removed
    after: tuple[str, ...]  # context + added


@dataclass(frozen=True)
class FilePatch:
    old_path: str | None  # None: new file
    new_path: str | None  # None: deleted file
    hunks: tuple[Hunk, ...]

    @property
    def path(self) -> str:
        p = self.new_path or self.old_path
        assert p is not None  # parse_patch never builds a FilePatch with neither
        return p


@dataclass(frozen=True)
class FileStatus:
    path: str
    state: State
    sha256: str | None  # of the installed file as checked; None when absent
    detail: str = ""


@dataclass(frozen=True)
class PatchStatus:
    name: str
    path: str
    sha256: str
    files: tuple[FileStatus, ...]

    @property
    def state(self) -> State:
        states = {f.state for f in self.files}
        worst: tuple[State, ...] = ("missing-file", "conflict", "not-applied")
        return next((s for s in worst if s in states), "applied")


@dataclass(frozen=True)
class PatchReport:
    root: str
    patches: tuple[PatchStatus, ...]

    @property
    def all_applied(self) -> bool:
        return all(p.state == "applied" for p in self.patches)

    def missing(self) -> list[PatchStatus]:
        return [p for p in self.patches if p.state != "applied"]


# --------------------------------------------------------------------------- parsing


def _strip_prefix(path: str) -> str | None:
    path = path.split("\t", 1)[0].strip()
    if path == "/dev/null":
        return None
    if path.startswith(("a/", "b/")):
        return path[2:]
    return path


def parse_patch(text: str, *, source: str) -> tuple[FilePatch, ...]:
    """Parse a unified diff; PatchError names `source` and the line when it is malformed."""
    if PLACEHOLDER_MARK in text.split("\n", 3)[0] or text.startswith(PLACEHOLDER_MARK):
        raise PatchError(
            f"{source}: this is a placeholder for a lab patch artifact, not a patch; replace it "
            "with the lab's file (see fixtures/patches/README.md)"
        )
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if line.startswith(("GIT binary patch", "Binary files ")):
            raise PatchError(f"{source}: line {n}: binary patches cannot be checked")
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("--- "):
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"{source}: line {i + 2}: '--- {line[4:]}' is not followed by '+++'")
        old, new = _strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:])
        if old is None and new is None:
            raise PatchError(f"{source}: line {i + 1}: both sides are /dev/null")
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            hunk, i = _parse_hunk(lines, i, source)
            hunks.append(hunk)
        if not hunks:
            raise PatchError(f"{source}: line {i + 1}: file section {new or old!r} has no hunk")
        files.append(FilePatch(old, new, tuple(hunks)))
    if not files:
        raise PatchError(f"{source}: no unified-diff file sections ('--- a/...', '+++ b/...')")
    return tuple(files)


def _parse_hunk(lines: list[str], i: int, source: str) -> tuple[Hunk, int]:
    m = _HUNK.match(lines[i])
    if m is None:
        raise PatchError(f"{source}: line {i + 1}: malformed hunk header {lines[i][:80]!r}")
    header_line = i + 1
    old_n = int(m.group(2)) if m.group(2) is not None else 1
    new_n = int(m.group(4)) if m.group(4) is not None else 1
    before: list[str] = []
    after: list[str] = []
    i += 1
    while len(before) < old_n or len(after) < new_n:
        if i >= len(lines):
            raise PatchError(
                f"{source}: line {header_line}: hunk ends early (header says -{old_n} +{new_n}, "
                f"found -{len(before)} +{len(after)})"
            )
        line = lines[i]
        tag, body = line[:1], line[1:]
        if tag == " " or line == "":  # some tools drop the space of an empty context line
            before.append(body)
            after.append(body)
        elif tag == "-":
            before.append(body)
        elif tag == "+":
            after.append(body)
        elif tag == "\\":  # "\ No newline at end of file"
            pass
        else:
            raise PatchError(
                f"{source}: line {i + 1}: unexpected {line[:40]!r} inside a hunk (header at "
                f"line {header_line} says -{old_n} +{new_n})"
            )
        i += 1
    if len(before) != old_n or len(after) != new_n:
        raise PatchError(
            f"{source}: line {header_line}: hunk has -{len(before)} +{len(after)} lines but its "
            f"header says -{old_n} +{new_n}"
        )
    while i < len(lines) and lines[i].startswith("\\"):
        i += 1
    return Hunk(header_line, tuple(before), tuple(after)), i


# --------------------------------------------------------------------------- checking


def _norm(lines: Sequence[str]) -> list[str]:
    return [s.rstrip() for s in lines]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    if not needle:
        return True
    n = len(needle)
    first = needle[0]
    return any(
        haystack[k] == first and haystack[k : k + n] == needle for k in range(len(haystack) - n + 1)
    )


def check_file(fp: FilePatch, root: Path) -> FileStatus:
    target = root / fp.path
    if not target.is_file():
        if fp.new_path is None:  # a deletion: absent means applied
            return FileStatus(fp.path, "applied", None, "deleted")
        if fp.old_path is None:
            return FileStatus(fp.path, "not-applied", None, "new file not present")
        return FileStatus(fp.path, "missing-file", None, f"{target} does not exist")
    data = target.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if fp.new_path is None:
        return FileStatus(fp.path, "not-applied", sha, "file the patch deletes is present")
    content = _norm(data.decode("utf-8", errors="replace").split("\n"))
    states: list[str] = []
    for h in fp.hunks:
        after, before = _norm(h.after), _norm(h.before)
        if _contains(content, after):
            states.append("applied")
        elif _contains(content, before):
            states.append("not-applied")
        else:
            states.append(f"conflict at hunk line {h.line}")
    if all(s == "applied" for s in states):
        return FileStatus(fp.path, "applied", sha)
    if all(s in ("applied", "not-applied") for s in states):
        n = states.count("not-applied")
        return FileStatus(fp.path, "not-applied", sha, f"{n} of {len(states)} hunks not applied")
    return FileStatus(fp.path, "conflict", sha, "; ".join(s for s in states if s.startswith("c")))


def engine_source_root(module: str = "vllm") -> Path:
    """The folder holding the installed package (paths in engine patches start there)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(f"cannot locate the installed {module!r} package to check patches")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def resolve(path: str, base: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base is None else base / p


def check_patches(
    files: Sequence[str],
    *,
    profile_dir: Path | None,
    source_root: str | None = None,
    module: str = "vllm",
) -> PatchReport:
    """Status and hashes of every patch; PatchError when a patch file itself is bad."""
    root = (
        resolve(source_root, profile_dir) if source_root is not None else engine_source_root(module)
    )
    statuses: list[PatchStatus] = []
    for name in files:
        path = resolve(name, profile_dir)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise PatchError(f"patch file {path} does not exist") from None
        text = raw.decode("utf-8", errors="replace")
        parsed = parse_patch(text, source=str(path))
        statuses.append(
            PatchStatus(
                name=Path(name).name,
                path=str(path),
                sha256=hashlib.sha256(raw).hexdigest(),
                files=tuple(check_file(fp, root) for fp in parsed),
            )
        )
    return PatchReport(root=str(root), patches=tuple(statuses))


def require_patches(
    profile_name: str,
    files: Sequence[str],
    *,
    profile_dir: Path | None,
    source_root: str | None = None,
    module: str = "vllm",
) -> PatchReport:
    """The report when every patch is applied; UnpatchedEngineError naming the rest."""
    report = check_patches(files, profile_dir=profile_dir, source_root=source_root, module=module)
    missing = report.missing()
    if missing:
        detail = "; ".join(
            f"{p.name} ({p.state}: "
            + ", ".join(
                f"{f.path} {f.state}{' - ' + f.detail if f.detail else ''}"
                for f in p.files
                if f.state != "applied"
            )
            + ")"
            for p in missing
        )
        raise UnpatchedEngineError(
            f"profile {profile_name!r}: the {module} installed under {report.root} lacks "
            f"{len(missing)} required patch(es): {detail}. Apply them (git apply) or install "
            "the patched build before measuring"
        )
    return report
