"""Reading and writing servelab's files: atomic durable writes, reads that name the file.

A write goes to a temporary file in the destination's folder, is flushed and fsynced, renamed
over the destination, and the folder is fsynced so the rename itself survives a crash. The
temporary file is created with mode 0o666 and the kernel applies the umask (and any default
ACL) as for any other new file: `tempfile.mkstemp` would force 0o600, which leaves records and
baselines unreadable to the rest of a shared lab disk.

Reads turn "missing", "unreadable" and "not valid JSON/TOML" into the caller's ServelabError
subclass, with the path first.
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

from servelab.errors import ServelabError

_NEW_FILE_MODE = 0o666  # as open(..., "w") asks for; the umask takes away the rest


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably; parents are created."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """`data` as indented JSON with a final newline, written like `atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, flags, _NEW_FILE_MODE)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data itself is synced
    finally:
        os.close(fd)


def read_text(
    path: Path, *, error: type[ServelabError], what: str, missing_ok: bool = False
) -> str | None:
    """The file's text; None when it is missing and `missing_ok`; else `error` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{path}: {what} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from None


def read_json(path: Path, *, error: type[ServelabError], what: str, advice: str = "") -> Any:
    """Parsed JSON of `path`; missing, unreadable or corrupt: `error` naming the file.

    `advice` (what to do) follows the message for a corrupt or truncated file.
    """
    text = read_text(path, error=error, what=what) or ""
    return parse_json(text, path=path, error=error, what=what, advice=advice)


def parse_json(
    text: str, *, path: Path, error: type[ServelabError], what: str, advice: str = ""
) -> Any:
    """`text` read from `path` as JSON; corrupt or truncated: `error` naming the file."""
    try:
        return json.loads(text)
    except ValueError as exc:
        tail = f". {advice}" if advice else ""
        raise error(f"{path}: corrupt or truncated {what} JSON ({exc}){tail}") from None


def read_toml(path: Path, *, error: type[ServelabError], what: str) -> dict[str, Any]:
    """Parsed TOML of `path`; a missing file or invalid TOML raises `error` naming the file."""
    try:
        return tomllib.loads(read_text(path, error=error, what=what) or "")
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None
