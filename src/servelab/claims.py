"""Claims-registry export: one `submitted` lab claim per throughput figure of a record,
in the shape the lab's `claims/README.md` and `tools/validate-claims.py` require."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any


def claim_id(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def claims(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One claims-registry entry per throughput figure (status `submitted`, by `lab`)."""
    date = time.strftime("%Y-%m-%d", time.gmtime(float(record["session"]["finished_at"])))
    host = record["host"]
    accels = host.get("accelerators") or []
    out = []
    for res in record["results"]:
        community = res["community"]
        for f in res["figures"]:
            if "tok/s" not in f["unit"] or f["value"] is None or f["value"] <= 0:
                continue
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
            out.append(
                {
                    "id": ident,
                    "model": community["Model"],
                    "recipe": {
                        "engine": community["Engine/backend"],
                        "quant": community["Quantization"],
                        "speedup": None,
                        # The registry needs cards >= 1; a CPU-only run says so in `hardware`.
                        "cards": max(1, len(accels)),
                        "tp": 1,
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
