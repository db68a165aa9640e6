"""The client at GPU rates against the scripted stand-in (issue 16 item 5, on any machine).

The stand-in (tests/fakes/scripted_server.py, its own process; an honest stand-in: no engine
has exact latencies) streams at the rates llama-server reached on an H100 (BENCHMARKS.md §12:
TPOT 33.1 ms at c64, 46.8 ms at c256), so what the clients read apart is their own doing.
Per level: servelab alone once (its saturation check: event-loop lag and CPU share), then
`--runs` shared runs (`perf.shared_runs`: servelab and vLLM's request function each drive
half the level at one instant, the second in its own process), judged as
`perf/test_client_rates.py` judges them on a real engine (pairs' median, 2 % plus 5 SE).

    .venv/bin/python benchmarks/client_rates.py --levels 64:33.1 256:46.8 \\
        --json results/client_rates.json

Needs vLLM installed (its request function is the second client) and the repository root on
the path (run it from there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.shared_runs import SecondJob, SharedRun, paired_runs
from tests.fakes import scripted_server

from servelab import metrics
from servelab.client import completion_payload
from servelab.loadgen import run_requests_async
from servelab.server import Endpoint


def level_figures(
    ep: Endpoint, level: int, output: int, runs: int, tag: str, timeout_s: float
) -> dict[str, Any]:
    """servelab alone at `level`, then `runs` shared runs of level/2 streams each."""
    texts = [f"{tag} alone {i}" for i in range(level)]
    alone = asyncio.run(
        run_requests_async(
            ep,
            [completion_payload("scripted", t, output) for t in texts],
            concurrency=level,
            timeout_s=timeout_s,
        )
    )
    m = metrics.compute(alone.records, alone.start_ns, alone.end_ns)
    assert m.ttft_ms is not None and m.tpot_ms is not None
    busy = [b for b in alone.client_busy() if b is not None]
    half = level // 2

    def inputs(r: int) -> tuple[list[dict[str, Any]], SecondJob]:
        job = SecondJob(
            None,
            ep.api_base + "/completions",
            "scripted",
            tuple(f"{tag} run{r} second {i}" for i in range(level)),
            level - half,
            4,
            output,
            True,
        )
        mine = [f"{tag} run{r} servelab {i}" for i in range(level)]
        return [completion_payload("scripted", t, output) for t in mine], job

    def each(r: int, run: SharedRun, mine: dict[str, float], second: dict[str, float]) -> None:
        print(
            f"  c{level} shared run {r}: TTFT {mine['median_ttft_ms']:.2f} vs "
            f"{second['median_ttft_ms']:.2f} ms, TPOT {mine['median_tpot_ms']:.3f} vs "
            f"{second['median_tpot_ms']:.3f} ms (servelab vs vLLM's function); "
            f"servelab's side valid: {not run.servelab.invalid_reasons(0.0)}",
            file=sys.stderr,
            flush=True,
        )

    pairs = paired_runs(ep, runs, inputs, 4, half, output, timeout_s=timeout_s, each=each)
    checks = pairs.checks
    return {
        "level": level,
        "alone": {
            "median_ttft_ms": m.ttft_ms.median,
            "median_tpot_ms": m.tpot_ms.median,
            "client_busy": max(busy) if busy else None,
            "invalid": alone.invalid_reasons(0.0),
        },
        "servelab": {k: statistics.median(v) for k, v in pairs.ours.items()},
        "vllm_request_func": {k: statistics.median(v) for k, v in pairs.theirs.items()},
        "per_run": {"servelab": pairs.ours, "vllm_request_func": pairs.theirs},
        "pairs_median_diff": {k: c.diff for k, c in checks.items()},
        "tolerance": {k: c.tolerance for k, c in checks.items()},
        "agree": {k: c.ok for k, c in checks.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--levels",
        nargs="+",
        default=["64:33.1", "256:46.8"],
        help="CONCURRENCY:ITL_MS pairs (the stand-in's gap at that level)",
    )
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--output", type=int, default=32, help="tokens a request")
    ap.add_argument("--runs", type=int, default=5, help="shared runs a level")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    rows = []
    for spec in args.levels:
        level_s, itl_s = spec.split(":")
        level, itl = int(level_s), float(itl_s)
        with scripted_server.process(args.ttft_ms, itl) as ep:
            row = level_figures(ep, level, args.output, args.runs, f"c{level}", args.timeout_s)
        row["script"] = {"ttft_ms": args.ttft_ms, "itl_ms": itl, "output_tokens": args.output}
        rows.append(row)
    print(
        "| c | script TTFT / ITL ms | servelab alone: TTFT, TPOT ms, busy | shared runs: TTFT ms "
        "servelab / vLLM's (pairs' median, tolerance) | TPOT ms servelab / vLLM's (pairs' "
        "median, tolerance) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        a, s, v = r["alone"], r["servelab"], r["vllm_request_func"]
        d, t = r["pairs_median_diff"], r["tolerance"]
        busy = "n/a" if a["client_busy"] is None else f"{a['client_busy']:.0%}"
        print(
            f"| {r['level']} | {r['script']['ttft_ms']:g} / {r['script']['itl_ms']:g} | "
            f"{a['median_ttft_ms']:.2f}, {a['median_tpot_ms']:.3f}, {busy} | "
            f"{s['median_ttft_ms']:.2f} / {v['median_ttft_ms']:.2f} "
            f"({d['median_ttft_ms']:+.2%}, ±{t['median_ttft_ms']:.1%}) | "
            f"{s['median_tpot_ms']:.3f} / {v['median_tpot_ms']:.3f} "
            f"({d['median_tpot_ms']:+.2%}, ±{t['median_tpot_ms']:.1%}) |"
        )
    if args.json is not None:
        doc = {
            "kind": "servelab-client-rates",
            "started": started,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "command": " ".join(sys.argv),
            "levels": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
