"""Claims-registry export: one `submitted` lab claim per decode or output throughput
measurement of a record, in the shape the lab's `claims/README.md` and
`tools/validate-claims.py` require.

A claim's `tok_s` is a decode or output rate only: prefill rates, session-reload rates and
total (prompt + output) rates are other quantities and are not claimed. A concurrency level
is one measurement, claimed once (vLLM's output throughput; the lab's wall aggregate of the
same runs is quoted in its text). `recipe.cards` is what the profile uses (its
`hardware.count`) and `recipe.tp` its `--tensor-parallel-size`, both read from the record's
stack, not from the host the client ran on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: Metrics whose tok/s is a decode or output rate (per stream or aggregate).
OUTPUT_RATE = re.compile(r"^(decode|output|wall_aggregate)")
#: Within one measurement, the figure claimed: vLLM's definition first.
PREFERENCE = ("output_throughput", "decode", "wall_aggregate")
_LEVEL = re.compile(r"_c\d+$")


def claim_id(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def is_output_rate(f: Mapping[str, Any]) -> bool:
    return (
        f["unit"] == "tok/s"
        and bool(OUTPUT_RATE.match(str(f["metric"])))
        and f["value"] is not None
        and f["value"] > 0
    )


def tensor_parallel(command: Sequence[str]) -> int | None:
    """`--tensor-parallel-size N` / `-tp N` / `--tensor-parallel-size=N`; None when absent."""
    for i, a in enumerate(command):
        value = None
        if a in ("--tensor-parallel-size", "-tp") and i + 1 < len(command):
            value = command[i + 1]
        elif a.startswith("--tensor-parallel-size="):
            value = a.split("=", 1)[1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def _measurement(f: Mapping[str, Any]) -> tuple[Any, ...]:
    """Figures of one measurement: same shape, level and state, from the same sweep (a
    metric named per concurrency level) or the same single-stream test."""
    shape = f["shape"]
    return (
        tuple(sorted(shape.items())),
        f["concurrency"],
        f["state"],
        bool(_LEVEL.search(str(f["metric"]))),
    )


def _rank(f: Mapping[str, Any]) -> int:
    metric = str(f["metric"])
    return next((i for i, p in enumerate(PREFERENCE) if metric.startswith(p)), len(PREFERENCE))


def claims(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One claims-registry entry per decode/output throughput measurement."""
    date = time.strftime("%Y-%m-%d", time.gmtime(float(record["session"]["finished_at"])))
    out = []
    for res in record["results"]:
        community = res["community"]
        stack = res.get("stack") or {}
        command = stack.get("command") or []
        cards = stack.get("cards")
        tp = tensor_parallel(command)
        groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
        for f in res["figures"]:
            if is_output_rate(f):
                groups.setdefault(_measurement(f), []).append(f)
        for group in groups.values():
            f, *others = sorted(group, key=_rank)
            shape = f["shape"]
            ident = claim_id(f"{res['profile']}-{f['key']}-{date}")
            parts = [
                f"{k.split('_')[0]} {shape[k]}"
                for k in ("prompt_tokens", "output_tokens", "context_tokens")
                if shape.get(k) is not None
            ]
            metric = (
                f"{f['title']} [{f['metric']}], {f['unit']}, median of "
                f"{len(f['runs'])} runs; {', '.join(parts)}, c{f['concurrency']}; "
                f"{f['state']}; {f['identity']['engine']}"
            )
            metric += "".join(
                f"; same runs' {o['title']} [{o['metric']}]: {o['value']:.4g} {o['unit']}"
                for o in others
            )
            if cards is None:
                metric += "; card count not recorded (external endpoint or an older record)"
            out.append(
                {
                    "id": ident,
                    "model": community["Model"],
                    "recipe": {
                        "engine": community["Engine/backend"],
                        "quant": community["Quantization"],
                        "speedup": None,
                        # The registry needs cards >= 1; a CPU-only run says so in `hardware`.
                        "cards": max(1, int(cards or 0)),
                        "tp": tp or 1,
                        "hardware": community["Hardware"],
                        "shape": shape,
                    },
                    "claimed": {"tok_s": f["value"], "metric": metric, "date": date, "by": "lab"},
                    "status": "submitted",
                    "history": [
                        {
                            "date": date,
                            "event": "measured by servelab "
                            f"({record['session']['servelab_commit']})",
                        }
                    ],
                }
            )
    return out


def validate_claim(c: Mapping[str, Any]) -> list[str]:
    """The registry's checks (claims/README.md) for a `submitted` lab claim."""
    problems = []
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", str(c.get("id", ""))):
        problems.append("id missing or not lowercase-hyphenated")
    if not c.get("model"):
        problems.append("model missing")
    r = c.get("recipe") or {}
    problems += [f"recipe.{k} missing" for k in ("engine", "quant") if not r.get(k)]
    if "speedup" not in r:
        problems.append("recipe.speedup key missing")
    for k in ("cards", "tp"):
        if not isinstance(r.get(k), int) or r[k] < 1:
            problems.append(f"recipe.{k} must be a positive integer")
    cl = c.get("claimed") or {}
    if not isinstance(cl.get("tok_s"), (int, float)) or cl["tok_s"] <= 0:
        problems.append("claimed.tok_s must be positive")
    problems += [f"claimed.{k} missing" for k in ("metric", "date", "by") if not cl.get(k)]
    if not re.fullmatch(r"\d{4}(-\d{2}){0,2}", str(cl.get("date", ""))):
        problems.append("claimed.date format")
    if c.get("status") != "submitted" or "verification" in c:
        problems.append("status must be submitted without verification")
    hist = c.get("history")
    if (
        not isinstance(hist, list)
        or not hist
        or not all(h.get("date") and h.get("event") for h in hist)
    ):
        problems.append("history must be a non-empty list of {date, event}")
    return problems
