"""vLLM's result JSON (`vllm bench serve --save-result`) out of a record, and such files back
in as a labeled record.

Out: one vLLM result per (target, test, run labels) group of the record's `raw.jsonl` rows
(a vLLM run is one shape at one concurrency), computed by `servelab.metrics` with vLLM's
definitions, in exactly the keys vLLM 0.32's `main_async` writes (`--save-detailed` arrays
optional). Where vLLM writes 0 for "no data", servelab writes null. The run's duration is
the first request's arrival to the last request's end (the rows do not keep the dispatch
loop's own clock). servelab's labels travel as vLLM `--metadata` keys (`servelab_*`).

In: any recent vLLM version's file (one JSON object, or one per line with
`--append-result`); every known key is kept under the record's `lab.vllm`, unknown keys
under `lab.vllm_extra`; files of one model, shape and concurrency become the runs of one
figure per catalogue metric, so `servelab compare` and `servelab report` read them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from servelab import metrics
from servelab.errors import RecordError

#: The header `main_async` writes before the benchmark's result (vLLM 0.32 serve.py).
HEADER_KEYS = (
    "date",
    "endpoint_type",
    "backend",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
)
#: Scalars of `benchmark()`'s result dict for a generation task.
RESULT_KEYS = (
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    "rtfx",
)
#: Per-request arrays vLLM keeps even without --save-detailed.
ALWAYS_ARRAYS = ("latencies", "queue_times")
#: Per-request arrays only --save-detailed keeps.
DETAILED_ARRAYS = (
    "input_lens",
    "output_lens",
    "start_times",
    "ttfts",
    "itls",
    "generated_texts",
    "errors",
)
#: Later and older vLLM versions' keys that servelab knows but does not write.
OTHER_KNOWN = ("ramp_up_strategy", "ramp_up_start_rps", "ramp_up_end_rps")
METADATA_PREFIX = "servelab_"
_STAT_KEY = re.compile(r"^(mean|median|std|p\d+(?:\.\d+)?)_([a-z0-9_]+)_ms$")
_SUMMARY_KEYS = frozenset(
    {*HEADER_KEYS, *RESULT_KEYS, *ALWAYS_ARRAYS, *DETAILED_ARRAYS, *OTHER_KNOWN}
)
#: Imported figures: catalogue name template -> the vLLM key it is read from.
IMPORTED = {
    "output_throughput_c{c}": "output_throughput",
    "total_throughput_c{c}": "total_token_throughput",
    "median_ttft_ms_c{c}": "median_ttft_ms",
    "median_tpot_ms_c{c}": "median_tpot_ms",
}


# --------------------------------------------------------------------------- out


def _as_record(row: Mapping[str, Any]) -> Any:
    from servelab.client import RequestRecord

    names = {f.name for f in fields(RequestRecord)}
    body = {k: v for k, v in row.items() if k in names}
    for k in ("chunk_ns", "chunk_tokens"):
        if isinstance(body.get(k), list):
            body[k] = tuple(body[k])
    try:
        return RequestRecord(**body)
    except TypeError as exc:
        raise RecordError(
            f"raw.jsonl row {row.get('index', '?')} of test {row.get('test', '?')!r} is not a "
            f"request row ({exc}); export a record written by this servelab"
        ) from None


def _labels(row: Mapping[str, Any]) -> dict[str, Any]:
    from servelab.client import RequestRecord

    names = {f.name for f in fields(RequestRecord)}
    return {k: v for k, v in row.items() if k not in names}


@dataclass(frozen=True)
class Group:
    """One vLLM run: the rows of one target, test and run labels."""

    profile: str
    labels: dict[str, Any]  # test, run, concurrency, prompt_length, ...
    rows: list[dict[str, Any]]

    @property
    def name(self) -> str:
        rest = "-".join(f"{k}{v}" for k, v in self.labels.items() if k not in ("test", "profile"))
        return "-".join(x for x in (self.profile, str(self.labels.get("test", "")), rest) if x)


def groups(record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Group]:
    """The record's rows grouped as vLLM runs (in the order they were measured)."""
    profiles = [str(r["profile"]) for r in record["results"]]
    out: dict[tuple[str, str], Group] = {}
    for row in rows:
        labels = _labels(row)
        profile = labels.get("profile") or labels.get("target")
        if profile is None:
            if len(profiles) != 1:
                raise RecordError(
                    f"raw.jsonl rows carry no profile label and the record measured "
                    f"{len(profiles)} targets ({', '.join(profiles) or 'none'}); export a "
                    "record of one target"
                )
            profile = profiles[0]
        key = (str(profile), json.dumps(labels, sort_keys=True))
        out.setdefault(key, Group(str(profile), labels, [])).rows.append(dict(row))
    return list(out.values())


def _model_of(record: Mapping[str, Any], profile: str) -> str:
    for res in record["results"]:
        if res["profile"] == profile:
            return str(res["fingerprint"].get("model") or "")
    return ""


def to_result(
    group: Group,
    *,
    model_id: str,
    started_at: float,
    detailed: bool = False,
    percentiles: Sequence[float] = metrics.DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The vLLM result dict of one group, in the order `main_async` writes its keys."""
    recs = [_as_record(r) for r in group.rows]
    start = min(r.arrival_ns for r in recs)
    end = max(max(x for x in (r.end_ns, r.done_ns, r.send_ns) if x is not None) for r in recs)
    m = metrics.compute(recs, start, end, percentiles=percentiles)
    concurrency = group.labels.get("concurrency")
    if concurrency is None and len(recs) == 1:
        concurrency = 1
    arrivals = sorted(r.arrival_ns for r in recs)
    span = (arrivals[-1] - arrivals[0]) / 1e9
    rate: float | str = "inf" if span <= 0 else (len(recs) - 1) / span
    chosen = ["ttft", "tpot", "itl", "e2el"]
    if concurrency is not None:
        chosen.append("client_queue_time")  # vLLM adds it whenever --max-concurrency is set
    body = metrics.to_vllm_json(m, recs, percentile_metrics=chosen)
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S", time.gmtime(started_at)),
        "endpoint_type": "vllm",
        "backend": "vllm",
        "label": group.profile,
        "model_id": model_id,
        "tokenizer_id": model_id,
        "num_prompts": len(recs),
    }
    for k, v in group.labels.items():
        out[METADATA_PREFIX + k] = str(v)  # vLLM --metadata KEY=VALUE: strings
    out["request_rate"] = rate
    out["burstiness"] = 1.0
    out["max_concurrency"] = concurrency
    for k in RESULT_KEYS:
        out[k] = body.get(k, 0.0 if k == "rtfx" else None)
    for k in ALWAYS_ARRAYS:
        out[k] = body[k]
    if detailed:
        for k in DETAILED_ARRAYS:
            out[k] = body[k]
    out.update({k: v for k, v in body.items() if _STAT_KEY.match(k)})
    return out


def export_record(
    record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, detailed: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """(name, vLLM result) per vLLM run of the record: from its raw rows, or, for a record
    imported from vLLM files, those files' values as they were read."""
    lab = record.get("lab") or {}
    if not rows and lab.get("vllm"):
        out = []
        for i, entry in enumerate(lab["vllm"]):
            res = dict(entry["result"])
            res.update((lab.get("vllm_extra") or {}).get(entry.get("file"), {}))
            if not detailed:
                res = {k: v for k, v in res.items() if k not in DETAILED_ARRAYS}
            name = str(entry.get("file") or f"run{i}").replace(".json#", "-")
            out.append((name.removesuffix(".json"), res))
        return out
    started = float(record["session"]["started_at"])
    return [
        (
            g.name,
            to_result(
                g, model_id=_model_of(record, g.profile), started_at=started, detailed=detailed
            ),
        )
        for g in groups(record, rows)
    ]


# --------------------------------------------------------------------------- in


def read_results(path: Path) -> list[dict[str, Any]]:
    """The vLLM results in one file (one JSON object, or one per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    try:
        items = [json.loads(text)]
    except ValueError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise RecordError(f"{path}: not JSON nor JSON lines ({exc})") from None
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict) or "completed" not in item or "duration" not in item:
            raise RecordError(
                f"{path}: result {n} has no 'completed' and 'duration': not a "
                "`vllm bench serve --save-result` file"
            )
    return items


def split(result: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keys servelab knows, the rest): the rest is kept, never dropped."""
    known = {k: v for k, v in result.items() if k in _SUMMARY_KEYS or _STAT_KEY.match(k)}
    known.update({k: v for k, v in result.items() if k.startswith(METADATA_PREFIX)})
    return known, {k: v for k, v in result.items() if k not in known}


def _mean_len(result: Mapping[str, Any], total: str, lens: str) -> int | None:
    per = result.get(lens)
    if isinstance(per, list) and per and len(set(per)) == 1:
        return int(per[0])
    done = result.get("completed") or 0
    value = result.get(total)
    return round(value / done) if done and isinstance(value, (int, float)) else None


def shape_of(result: Mapping[str, Any]) -> Any:
    from servelab.figures import Shape

    c = result.get("max_concurrency")
    concurrency = int(c) if isinstance(c, (int, float)) else int(result.get("num_prompts") or 1)
    return Shape(
        prompt_tokens=_mean_len(result, "total_input_tokens", "input_lens"),
        output_tokens=_mean_len(result, "total_output_tokens", "output_lens"),
        concurrency=concurrency,
    )


def import_results(
    paths: Sequence[Path], *, profile: str | None = None, now: float | None = None
) -> dict[str, Any]:
    """One servelab record of the vLLM result files at `paths`."""
    from servelab.baselines import Fingerprint
    from servelab.catalogue import spec
    from servelab.figures import Identity
    from servelab.hardware import HostIdentity
    from servelab.record_build import TargetInfo, build_record
    from servelab.session import SessionInfo

    entries: list[dict[str, Any]] = []
    for p in paths:
        for n, result in enumerate(read_results(p)):
            known, extra = split(result)
            entries.append(
                {"file": p.name if n == 0 else f"{p.name}#{n}", "result": known, "extra": extra}
            )
    if not entries:
        raise RecordError("no vLLM result files given; name at least one")
    models = sorted({str(e["result"].get("model_id") or "unknown") for e in entries})
    if len(models) != 1:
        raise RecordError(
            f"the files measured {len(models)} models ({', '.join(models)}); import one "
            "model's files into one record"
        )
    first = entries[0]["result"]
    name = profile or str(first.get("label") or "") or "vllm-import"
    engine = f"vllm bench serve (backend {first.get('backend') or 'unknown'})"
    host = HostIdentity(
        "imported",
        "unknown (imported from vLLM result JSON)",
        None,
        None,
        None,
        "unknown",
        "unknown",
        "unknown",
    )
    identity = Identity(profile=name, engine=engine, host=host.key, model=models[0])
    runs: dict[tuple[Any, str], list[float]] = {}
    for e in entries:
        shape = shape_of(e["result"])
        for template, key in IMPORTED.items():
            v = e["result"].get(key)
            runs.setdefault((shape, template), []).append(
                float(v) if isinstance(v, (int, float)) else float("nan")
            )
    figs = [
        spec(t).figure(
            tuple(vs),
            shape=shape,
            identity=identity,
            notes=(f"imported from {len(vs)} vLLM result file(s)",),
            c=shape.concurrency,
        )
        for (shape, t), vs in runs.items()
    ]
    stamp = now if now is not None else time.time()
    session = SessionInfo(
        stamp,
        stamp,
        "servelab import " + " ".join(p.name for p in paths),
        0,
        False,
        "",
        "servelab import",
    )
    target = TargetInfo(name, models[0], engine, Fingerprint(host.key, engine, models[0]))
    lab = {
        "vllm": [{k: v for k, v in e.items() if k != "extra"} for e in entries],
        "vllm_extra": {e["file"]: e["extra"] for e in entries if e["extra"]},
    }
    return build_record(session, host, [target], figs, lab=lab)
