"""One schema reader for servelab's files: profiles, quality files, baselines, records.

The frozen dataclasses the code works on are the schema. `read` derives a pydantic v2 model
from a dataclass (extra fields forbidden, strict types: no "8" for 8, no `true` for 1, no 3.0
for an int), validates the parsed TOML/JSON with it and builds the dataclass. Arrays become
tuples, tables become read-only mappings, nested dataclasses nest. A field the file leaves out
keeps the dataclass default. Fields marked ``metadata={"internal": True}`` are not read.

A validation error becomes the caller's ServelabError subclass naming the file, the field, the
expected type and the value found, e.g. ``p.toml: field 'model.context_len' must be int (got
str '2048')``. `dotted` names a field by its whole path; `nested` names the table it sits in
and then the field (``metrics['k']: field 'runs' item [1] must be float``); a file format can
pass its own `Locate` (the quality file names canaries by number and id).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict

from servelab.errors import ServelabError

T = TypeVar("T")

StepKind = Literal["field", "index", "key"]
Step = tuple[StepKind, str | int]


@dataclass(frozen=True)
class Place:
    """Where a problem is, for the message: ``{where}: field {field!r}{item}``."""

    where: str
    field: str
    item: str = ""


Locate = Callable[[Sequence[Step], Any], Place]
#: Keys that a dataclass's table may carry without them being read, per dataclass.
Ignored = tuple[tuple[type, frozenset[str]], ...]


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _render(steps: Sequence[Step]) -> str:
    out = ""
    for kind, value in steps:
        if kind == "field" or (kind == "key" and _BARE_KEY.fullmatch(str(value))):
            out += f".{value}" if out else str(value)  # as TOML writes it: env.HF_HOME
        else:
            out += f"[{value!r}]"
    return out


def dotted(steps: Sequence[Step], data: Any) -> Place:
    """The whole path is the field's name: ``field 'model.context_len'``."""
    return Place("", _render(steps))


def nested(steps: Sequence[Step], data: Any) -> Place:
    """The table is the place, the last key the field: ``metrics['k']: field 'runs'``."""
    last = max((i for i, (kind, _) in enumerate(steps) if kind == "field"), default=-1)
    if last < 0:
        return Place("", _render(steps))
    item = _render(steps[last + 1 :])
    return Place(_render(steps[:last]), str(steps[last][1]), f" item {item}" if item else "")


def check_version(
    data: Any, expected: int, *, file: Path | str, error: type[ServelabError], hint: str = ""
) -> None:
    """Refuse a file whose top-level ``schema_version`` is not `expected` (before the rest)."""
    if not isinstance(data, dict):
        raise error(f"{file}: the top level must be a table of fields (got {type(data).__name__})")
    got = data.get("schema_version")
    if got != expected or isinstance(got, bool):
        tail = f". {hint}" if hint else ""
        raise error(
            f"{file}: field 'schema_version' must be {expected} (got {got!r}); this servelab "
            f"reads version {expected}{tail}"
        )


def read(
    cls: type[T],
    data: Any,
    *,
    file: Path | str,
    error: type[ServelabError],
    locate: Locate = dotted,
    ignore: Mapping[type, frozenset[str]] | None = None,
) -> T:
    """Validate parsed file data against dataclass `cls` and build it.

    `ignore` names keys a table may carry that are not read (derived data such as a summary).
    """
    ignored = _freeze(ignore)
    key: Any = cls  # classes are hashable; typeshed's cache wrapper does not know type[T] is
    model = model_for(key, ignored)
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise error(describe(exc, model, data, file=file, locate=locate)) from None
    return _build(cls, parsed, ignored)


def _freeze(ignore: Mapping[type, frozenset[str]] | None) -> Ignored:
    return tuple(sorted((ignore or {}).items(), key=lambda kv: kv[0].__qualname__))


# --------------------------------------------------------------------------- models


# Deriving a model costs milliseconds; the cache holds pure functions of the classes.
@functools.cache
def model_for(cls: Any, ignored: Ignored = ()) -> type[BaseModel]:
    """The pydantic model that reads dataclass `cls` from TOML/JSON data."""
    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        spec[f.name] = (_file_type(hints[f.name], ignored), ... if required else None)
    for name in dict(ignored).get(cls, frozenset()):
        spec[name] = (Any, None)
    config = ConfigDict(extra="forbid", strict=True, frozen=True)
    model: type[BaseModel] = pydantic.create_model(f"{cls.__name__}File", __config__=config, **spec)
    return model


def _file_type(tp: Any, ignored: Ignored) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return model_for(tp, ignored)
    if origin in (typing.Union, types.UnionType):
        members = tuple(_file_type(a, ignored) for a in get_args(tp))
        return functools.reduce(lambda a, b: a | b, members)
    if origin in (tuple, list):
        return _generic(list)[_file_type(get_args(tp)[0], ignored)]
    if origin in (Mapping, dict):
        key, value = get_args(tp)
        return _generic(dict)[key, _file_type(value, ignored)]
    return tp


def _generic(origin: type) -> Any:
    """`origin` for subscripting with types computed at run time (list[X], dict[K, V])."""
    return origin


def _build(cls: type[T], parsed: BaseModel, ignored: Ignored) -> T:
    hints = typing.get_type_hints(cls)
    skip = dict(ignored).get(cls, frozenset())
    kwargs = {
        name: _value(hints[name], getattr(parsed, name), ignored)
        for name in parsed.model_fields_set
        if name not in skip
    }
    return cls(**kwargs)


def _value(tp: Any, value: Any, ignored: Ignored) -> Any:
    if value is None:
        return None
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, ignored)
    if origin in (typing.Union, types.UnionType):
        for member in get_args(tp):
            if (
                isinstance(member, type)
                and dataclasses.is_dataclass(member)
                and isinstance(value, model_for(member, ignored))
            ):
                return _build(member, value, ignored)
        return value
    if origin in (tuple, list):
        inner = get_args(tp)[0]
        return tuple(_value(inner, v, ignored) for v in value)
    if origin in (Mapping, dict):
        inner = get_args(tp)[1]
        return types.MappingProxyType({k: _value(inner, v, ignored) for k, v in value.items()})
    return value


# --------------------------------------------------------------------------- messages


def type_name(tp: Any) -> str:
    """How a message names the type a field expects."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"list of {type_name(get_args(tp)[0])}"
    if origin in (Mapping, dict):
        return f"table of {type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "table"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _walk(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[list[Step], Any, Any]:
    """Steps of `loc`, the type that holds the last step, and the type at the end."""
    steps: list[Step] = []
    holder: Any = model
    tp: Any = model
    for part in loc:
        tp = _unwrap_optional(tp)
        holder = tp
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            steps.append(("field", part))
            info = tp.model_fields.get(str(part))
            tp = info.annotation if info is not None else None
        elif origin is list:
            steps.append(("index", part))
            tp = get_args(tp)[0]
        elif origin is dict:
            steps.append(("key", part))
            tp = get_args(tp)[1]
        else:  # a union member tag or a validator's own step: not part of the file's path
            continue
    return steps, holder, tp


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def describe(
    exc: pydantic.ValidationError,
    model: type[BaseModel],
    data: Any,
    *,
    file: Path | str,
    locate: Locate = dotted,
) -> str:
    """The first problem pydantic found, as ``file: where: field 'x' must be T (got ...)``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    steps, holder, tp = _walk(model, first["loc"])
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        places = [
            locate(_walk(model, e["loc"])[0], data)
            for e in errors
            if e["type"] == "extra_forbidden" and e["loc"][:-1] == parent
        ]
        is_model = isinstance(holder, type) and issubclass(holder, BaseModel)
        allowed = sorted(holder.model_fields) if is_model else []
        shown = [p.field for p in places]
        if steps and locate is dotted:
            base = _render(steps[:-1])
            allowed = [f"{base}.{a}" if base else a for a in allowed]
        return (
            f"{_prefix(file, places[0])}unknown field(s) {shown}; allowed in this table: {allowed}"
        )
    place = locate(steps, data)
    if first["type"] == "missing":
        return f"{_prefix(file, place)}missing field {place.field!r} (expected {type_name(tp)})"
    value = first["input"]
    return (
        f"{_prefix(file, place)}field {place.field!r}{place.item} must be {type_name(tp)} "
        f"(got {type(value).__name__} {value!r})"
    )


def _prefix(file: Path | str, place: Place) -> str:
    return f"{file}: {place.where}: " if place.where else f"{file}: "
