"""Stored baselines, keyed by (host key, profile), and verdicts against them.

Three modules, one concept each: `schema` (the file format and its reader), `store` (load,
atomic update with history under a lock, provenance) and `compare` (verdicts through
`servelab.stats`). Every public name stays importable from `servelab.baselines`.
"""

from __future__ import annotations

from servelab.baselines.compare import Status, Verdict, compare, judge, judge_against_record
from servelab.baselines.schema import (
    CREATE_HINT,
    SCHEMA_VERSION,
    Baseline,
    Fingerprint,
    MetricBaseline,
    Provenance,
    Summary,
    figure_key,
    load_baseline,
    parse_baseline,
    repair_advice,
    shape_key,
)
from servelab.baselines.store import (
    BaselineStore,
    UpdateResult,
    servelab_commit,
    set_aside,
    utc_now,
    who,
)
from servelab.files import atomic_write_text  # records.py imports it from here

__all__ = [
    "CREATE_HINT",
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineStore",
    "Fingerprint",
    "MetricBaseline",
    "Provenance",
    "Status",
    "Summary",
    "UpdateResult",
    "Verdict",
    "atomic_write_text",
    "compare",
    "figure_key",
    "judge",
    "judge_against_record",
    "load_baseline",
    "parse_baseline",
    "repair_advice",
    "servelab_commit",
    "set_aside",
    "shape_key",
    "utc_now",
    "who",
]
