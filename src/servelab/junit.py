"""A judged figure as JUnit XML `<property>` entries of the test case that measured it.

Each name starts with the figure's key (metric, shape, warm or cold), so the several figures
of one test case stay apart: `<key>.metric`, `.unit`, `.labels`, `.value`, `.runs`,
`.baseline_median`, `.change`, `.verdict`. pytest writes them through the item's
`user_properties` (what `record_property` does) when run with `--junitxml`. A missing
value is the empty string, never 0.
"""

from __future__ import annotations

from servelab.baselines import Verdict, figure_key


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def properties(verdict: Verdict) -> list[tuple[str, object]]:
    f = verdict.figure
    key = figure_key(f)
    base = verdict.baseline.summary.median if verdict.baseline is not None else None
    change = verdict.comparison.change if verdict.comparison is not None else None
    state = "warm" if f.warm else "cold"
    labels = f"{f.shape.describe()}; {state}; {f.identity.describe()}"
    return [
        (f"{key}.metric", f.metric),
        (f"{key}.unit", f.unit),
        (f"{key}.labels", labels),
        (f"{key}.value", _num(f.value)),
        (f"{key}.runs", " ".join(repr(r) for r in f.runs)),
        (f"{key}.baseline_median", _num(base)),
        (f"{key}.change", _num(change)),
        (f"{key}.verdict", verdict.status),
    ]
