"""Labeled result records: what one perf session measured, in the lab's community format.

One concept per module; this module keeps the public names importable from one place:

- `servelab.record_build`: the record dict from the session's data (figures, verdicts,
  targets, lab extras);
- `servelab.record_markdown`: the community row and `record.md`'s tables;
- `servelab.record_files`: the record folder on disk (write, load, claims, raw rows, logs).

Every string passes through a `Redactor` before it is written. Records are plain data:
`servelab report` / `compare` read them back without pytest.
"""

from __future__ import annotations

from servelab.record_build import (
    ARTIFACTS,
    KIND,
    SCHEMA_VERSION,
    TargetInfo,
    build_record,
    figure_dict,
    figure_from_dict,
    jsonable,
    verdict_dict,
)
from servelab.record_files import (
    RecordPaths,
    load_record,
    record_figures,
    session_folder,
    write_record,
)
from servelab.record_markdown import (
    COMMUNITY_FIELDS,
    community_row,
    is_rate,
    is_total_rate,
    render_markdown,
)
from servelab.session import SessionInfo, request_row

__all__ = [
    "ARTIFACTS",
    "COMMUNITY_FIELDS",
    "KIND",
    "SCHEMA_VERSION",
    "RecordPaths",
    "SessionInfo",
    "TargetInfo",
    "build_record",
    "community_row",
    "figure_dict",
    "figure_from_dict",
    "is_rate",
    "is_total_rate",
    "jsonable",
    "load_record",
    "record_figures",
    "render_markdown",
    "request_row",
    "session_folder",
    "verdict_dict",
    "write_record",
]
