"""Does the telemetry sampler slow servelab's client? (issue 16 item 3: it must not, by 1 %.)

Against a running OpenAI-compatible server (on the GPU machine: llama.cpp's llama-server),
at each concurrency it runs the same closed-loop workload (servelab's load generator through
`workloads.concurrency_sweep`) alternately without and with the sampler running in this
process (A B, B A, A B ...: the side that leads alternates by pair; `--repetitions` pairs,
after one warm-up run), and prints per level:
the median over runs of each run's median TPOT and of its streamed chunks per second
(token chunks of all requests / run duration), without and with, and their ratio (with /
without). The JSON (`--out`) holds every run.

    .venv/bin/python benchmarks/telemetry_overhead.py --base-url http://127.0.0.1:8080 \\
        --model smollm2 --concurrency 1,64 --requests 128 --output-tokens 128 \\
        --repetitions 5 --telemetry nvml --out results/telemetry_overhead.json

`--profile` (default cuda-llamacpp-smollm2) only sets the engine dialect the client speaks
(llama-server: a connection per request, as in the perf suite); `--profile none` speaks
vLLM's. Prompts are counted in words (the same prompts on both sides; their token count does not
matter here). The sampler reads NVML (or xpu-smi) every `--interval-ms` on its own thread
in the client's process, exactly as the perf suite runs it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servelab import metrics, telemetry, workloads
from servelab.files import atomic_write_json
from servelab.loadgen import RunResult
from servelab.server import Endpoint

MakeSampler = Callable[[], telemetry.Sampler]


@dataclass(frozen=True)
class Run:
    concurrency: int
    repetition: int
    sampler: bool
    median_tpot_ms: float | None
    chunks_per_s: float
    requests: int
    failed: int
    telemetry_ticks: int  # readings the sampler took during the run (0 without it)
    telemetry_status: str


def chunks_per_s(run: RunResult) -> float:
    chunks = sum(len(r.chunk_ns) for r in run.records)
    return chunks / run.duration_s if run.duration_s > 0 else float("nan")


def _words(p: object) -> int:
    return len(str(p).split())


def one_run(
    endpoint: Endpoint, c: int, requests: int, prompt_tokens: int, output_tokens: int, tag: str
) -> RunResult:
    settings = workloads.Settings(
        progress=False, check_server_cache=False, token_ids=False, nonce=tag
    )
    prompts = workloads.Prompts(endpoint, count=_words, nonce=tag)
    (run,) = workloads.concurrency_sweep(
        endpoint,
        levels=[c],
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        requests_per_level=requests,
        warmup_requests=0,
        settings=settings,
        prompts=prompts,
    ).values()
    return run


def overhead(
    endpoint: Endpoint,
    *,
    levels: Sequence[int],
    requests: int,
    output_tokens: int,
    prompt_tokens: int = 32,
    repetitions: int = 5,
    make_sampler: MakeSampler,
    report: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Every run (A B A B ... per level) and, per level, the medians and ratios."""
    runs: list[Run] = []
    for c in levels:
        one_run(endpoint, c, min(requests, 2 * c), prompt_tokens, output_tokens, f"warm{c}")
        for rep in range(repetitions):
            # ABBA: the leading side alternates by repetition. On the H100 (2026-12-06) a
            # fixed order (without, then with) read the second leg 22 % faster at c64 in all
            # three repetitions, sampler or not: an order effect, not the sampler.
            for with_sampler in (False, True) if rep % 2 == 0 else (True, False):
                tag = f"c{c}r{rep}{'s' if with_sampler else 'n'}{time.time_ns()}"
                if with_sampler:
                    with make_sampler() as sampler:
                        res = one_run(endpoint, c, requests, prompt_tokens, output_tokens, tag)
                    ticks = sum(
                        res.start_ns <= t.readings[0].t_ns <= res.end_ns
                        for t in sampler.ticks
                        if t.readings
                    )
                    status = sampler.reason or telemetry.MEASURED
                else:
                    res = one_run(endpoint, c, requests, prompt_tokens, output_tokens, tag)
                    ticks, status = 0, "off"
                m = metrics.compute(res.records, res.start_ns, res.end_ns)
                run = Run(
                    c,
                    rep,
                    with_sampler,
                    m.tpot_ms.median if m.tpot_ms else None,
                    chunks_per_s(res),
                    len(res.records),
                    len(res.failed),
                    ticks,
                    status,
                )
                runs.append(run)
                report(
                    f"c{c} rep {rep + 1}/{repetitions} {'with' if with_sampler else 'without'}"
                    f": TPOT {run.median_tpot_ms} ms, {run.chunks_per_s:.1f} chunks/s"
                )
    return {"runs": [asdict(r) for r in runs], "levels": summarize(runs, levels)}


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(runs: Sequence[Run], levels: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for c in levels:
        mine = [r for r in runs if r.concurrency == c]
        row: dict[str, Any] = {"concurrency": c}
        for key in ("median_tpot_ms", "chunks_per_s"):
            without = _median([getattr(r, key) for r in mine if not r.sampler])
            with_ = _median([getattr(r, key) for r in mine if r.sampler])
            row[key] = {"without": without, "with": with_, "ratio": _ratio(with_, without)}
        row["failed"] = sum(r.failed for r in mine)
        row["ticks_per_run"] = _median([float(r.telemetry_ticks) for r in mine if r.sampler])
        row["telemetry"] = sorted({r.telemetry_status for r in mine if r.sampler})
        out.append(row)
    return out


def table(levels: Sequence[dict[str, Any]]) -> list[str]:
    def f(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        "| c | TPOT without (ms) | TPOT with (ms) | ratio | chunks/s without | chunks/s with "
        "| ratio | ticks/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in levels:
        t, k = row["median_tpot_ms"], row["chunks_per_s"]
        lines.append(
            f"| {row['concurrency']} | {f(t['without'], '.3f')} | {f(t['with'], '.3f')} "
            f"| {f(t['ratio'], '.4f')} | {f(k['without'], '.1f')} | {f(k['with'], '.1f')} "
            f"| {f(k['ratio'], '.4f')} | {f(row['ticks_per_run'], 'g')} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,64", help="levels, comma-separated")
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in words")
    ap.add_argument("--repetitions", type=int, default=5, help="A/B pairs per level")
    ap.add_argument("--telemetry", choices=("nvml", "xpu-smi"), default="nvml")
    ap.add_argument("--cards", default="", help="card ids, comma-separated (default: all)")
    ap.add_argument("--interval-ms", type=float, default=telemetry.DEFAULT_INTERVAL_MS)
    ap.add_argument(
        "--profile",
        default="cuda-llamacpp-smollm2",
        help="profile whose engine dialect the client speaks (llama-server: a connection per "
        "request); 'none': vLLM's",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    cards = tuple(x.strip() for x in args.cards.split(",") if x.strip())
    profile = None
    if args.profile != "none":
        from servelab.profiles import default_profile_dirs, load_named

        (profile,) = load_named([args.profile], default_profile_dirs())
    endpoint = Endpoint(base_url=args.base_url.rstrip("/"), model=args.model, profile=profile)

    def make_sampler() -> telemetry.Sampler:
        p = telemetry.Plan(args.telemetry, cards)
        return telemetry.Sampler(telemetry.make_source(p, args.interval_ms), args.interval_ms)

    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = overhead(
        endpoint,
        levels=levels,
        requests=args.requests,
        output_tokens=args.output_tokens,
        prompt_tokens=args.prompt_tokens,
        repetitions=args.repetitions,
        make_sampler=make_sampler,
        report=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print("\n".join(table(result["levels"])))
    if args.out is not None:
        doc = {
            "kind": "servelab-telemetry-overhead",
            "schema_version": 1,
            "started": started,
            "host": platform.node(),
            "args": {k: str(v) for k, v in vars(args).items()},
            **result,
        }
        atomic_write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
