"""servelab.files: atomic writes that respect the umask and fsync file and folder; reads that
name the file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from servelab.errors import BaselineError, RecordError
from servelab.files import atomic_write_json, atomic_write_text, read_json, read_toml


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_new_files_get_the_umask_mode_not_0600(
    tmp_path: Path, umask: None, mask: int, mode: int
) -> None:
    os.umask(mask)
    path = tmp_path / "deep" / "record.json"
    atomic_write_text(path, "x\n")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    atomic_write_text(path, "y\n")  # a replacement gets the same mode
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_text() == "y\n"


def test_write_fsyncs_the_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    assert synced == ["file", "dir"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.json"
    atomic_write_text(path, "old\n")

    def broken(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_json_is_indented_with_a_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert read_json(path, error=RecordError, what="record") == {"a": [1, 2], "b": 1}


def test_reads_raise_the_callers_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(RecordError, match=r"none\.json: record does not exist"):
        read_json(missing, error=RecordError, what="record")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(BaselineError) as info:
        read_json(bad, error=BaselineError, what="baseline", advice="Restore it")
    msg = str(info.value)
    assert msg.startswith(f"{bad}: corrupt or truncated baseline JSON (") and msg.endswith(
        ". Restore it"
    )
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(RecordError, match=r"folder\.json: cannot read record"):
        read_json(folder, error=RecordError, what="record")


def test_toml_reads_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text("a = [unclosed\n")
    with pytest.raises(RecordError, match=r"p\.toml: invalid TOML"):
        read_toml(p, error=RecordError, what="profile file")
    p.write_text("a = 1\n")
    assert read_toml(p, error=RecordError, what="profile file") == {"a": 1}
