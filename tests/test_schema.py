"""servelab.schema: the one reader for profiles, quality files and baselines (pydantic v2).

Strict types, extra fields forbidden, defaults kept, arrays as tuples, tables as read-only
mappings, and every problem named by file, field, expected type and the value found."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from servelab import schema
from servelab.errors import ProfileError, ServelabError


@dataclass(frozen=True)
class Inner:
    count: int
    rate: float = 1.0
    kind: Literal["a", "b"] = "a"
    note: str | None = None


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    tags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    items: tuple[Inner, ...] = ()
    by_key: Mapping[str, Inner] = field(default_factory=dict)
    maybe: Inner | None = None
    path: Path | None = field(default=None, metadata={"internal": True})


F = "f.toml"


def read(data: object, **kw: object) -> Outer:
    return schema.read(Outer, data, file=F, error=ProfileError, **kw)  # type: ignore[arg-type]


def test_builds_frozen_records_with_defaults_tuples_and_mappings() -> None:
    got = read(
        {
            "name": "x",
            "inner": {"count": 2, "rate": 3},
            "tags": ["a", "b"],
            "env": {"K": "V"},
            "items": [{"count": 1}],
            "by_key": {"k/1": {"count": 5, "kind": "b"}},
            "maybe": {"count": 9},
        }
    )
    assert got.inner == Inner(2, 3.0) and isinstance(got.inner.rate, float)
    assert got.tags == ("a", "b") and got.items == (Inner(1),)
    assert isinstance(got.env, types.MappingProxyType) and dict(got.env) == {"K": "V"}
    assert got.by_key["k/1"] == Inner(5, kind="b") and got.maybe == Inner(9)
    assert got.path is None
    plain = read({"name": "x", "inner": {"count": 1}})
    assert plain == Outer("x", Inner(1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"name": "x", "inner": {"count": "2"}},
            "f.toml: field 'inner.count' must be int (got str '2')",
        ),
        (
            {"name": "x", "inner": {"count": True}},
            "field 'inner.count' must be int (got bool True)",
        ),
        ({"name": "x", "inner": {"count": 2.0}}, "field 'inner.count' must be int (got float 2.0)"),
        ({"name": "x", "inner": {"count": 1, "rate": "1"}}, "field 'inner.rate' must be float"),
        (
            {"name": "x", "inner": {"count": 1, "kind": "c"}},
            "must be one of 'a', 'b' (got str 'c')",
        ),
        ({"name": "x", "inner": {"count": 1, "note": 3}}, "field 'inner.note' must be str or null"),
        ({"name": "x", "inner": {"count": 1}, "tags": ["a", 1]}, "field 'tags[1]' must be str"),
        ({"name": "x", "inner": {"count": 1}, "tags": "a"}, "field 'tags' must be list of str"),
        ({"name": "x", "inner": {"count": 1}, "env": {"K": 1}}, "field 'env.K' must be str"),
        ({"name": "x", "inner": 3}, "field 'inner' must be table (got int 3)"),
        ({"name": "x"}, "f.toml: missing field 'inner' (expected table)"),
        ({"inner": {"count": 1}}, "missing field 'name' (expected str)"),
        (
            {"name": "x", "inner": {"count": 1, "colour": 1, "shade": 2}},
            "f.toml: unknown field(s) ['inner.colour', 'inner.shade']; allowed in this table: "
            "['inner.count', 'inner.kind', 'inner.note', 'inner.rate']",
        ),
        ({"name": "x", "inner": {"count": 1}, "path": "/etc"}, "unknown field(s) ['path']"),
    ],
)
def test_problems_name_file_field_expected_type_and_value(data: object, message: str) -> None:
    with pytest.raises(ProfileError) as info:
        read(data)
    assert message in str(info.value)


def test_nested_names_the_table_then_the_field() -> None:
    data: dict[str, object] = {
        "name": "x",
        "inner": {"count": 1},
        "by_key": {"k/1": {"count": 1, "rate": [1]}},
    }
    with pytest.raises(ProfileError) as info:
        read(data, locate=schema.nested)
    assert str(info.value) == "f.toml: by_key['k/1']: field 'rate' must be float (got list [1])"
    data = {"name": "x", "inner": {"count": 1}, "tags": ["a", 2]}
    with pytest.raises(ProfileError, match=r"^f\.toml: field 'tags' item \[1\] must be str"):
        read(data, locate=schema.nested)


def test_ignored_keys_are_accepted_and_dropped() -> None:
    data = {"name": "x", "inner": {"count": 1, "summary": {"n": 1}}}
    with pytest.raises(ProfileError, match="unknown field"):
        read(data)
    got = read(data, ignore={Inner: frozenset({"summary"})})
    assert got.inner == Inner(1)


@pytest.mark.parametrize("version", [2, None, "1", True])
def test_check_version_refuses_other_versions(version: object) -> None:
    with pytest.raises(ServelabError, match=r"f\.toml: field 'schema_version' must be 1"):
        schema.check_version({"schema_version": version}, 1, file=F, error=ServelabError)
    schema.check_version({"schema_version": 1}, 1, file=F, error=ServelabError)
    with pytest.raises(ServelabError, match="top level must be a table"):
        schema.check_version([1], 1, file=F, error=ServelabError)
