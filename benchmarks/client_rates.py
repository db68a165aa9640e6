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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.shared_runs import GAP_S, SecondJob, SharedRun, paired_runs, second_extra
from tests.fakes import scripted_server

from servelab import metrics, workloads
from servelab.client import completion_payload
from servelab.engine_traits import traits_of
from servelab.loadgen import run_requests_async
from servelab.profiles import default_profile_dirs, load_named
from servelab.server import Endpoint


@dataclass(frozen=True)
class Target:
    """What the clients drive: the endpoint, how prompts are made and sent, and the second
    client's request-function file (None: the installed vLLM)."""

    ep: Endpoint
    prompt_len: int
    make: Callable[[str, int], list[str]]  # (salt, k) -> k distinct prompts
    bodies: Callable[[list[str], int], list[dict[str, Any]]]  # (texts, output) -> bodies
    source: str | None = None
    keep_alive: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


def _deciles(run: SharedRun) -> str:
    """Each side's TTFT p10 / p90 (ms): where a median sits between the engine's batches."""
    ours = [
        (r.first_token_ns - r.send_ns) / 1e6
        for r in run.servelab.records
        if r.first_token_ns is not None
    ]
    theirs = [o.ttft_s * 1e3 for o in run.second]
    q = [statistics.quantiles(v, n=10) for v in (ours, theirs)]
    return f"TTFT p10/p90 {q[0][0]:.1f}/{q[0][-1]:.1f} vs {q[1][0]:.1f}/{q[1][-1]:.1f} ms"


def level_figures(
    t: Target, level: int, output: int, runs: int, waves: int, gap_s: float, timeout_s: float
) -> dict[str, Any]:
    """servelab alone at `level`, then `runs` shared runs of level/2 streams each, every
    client sending `waves` x its streams requests (closed loop)."""
    tag = f"c{level}w{waves}"
    alone = asyncio.run(
        run_requests_async(
            t.ep,
            t.bodies(t.make(f"{tag} alone", level), output),
            concurrency=level,
            prompt_tokens=[t.prompt_len] * level,
            timeout_s=timeout_s,
        )
    )
    m = metrics.compute(alone.records, alone.start_ns, alone.end_ns)
    assert m.ttft_ms is not None and m.tpot_ms is not None
    busy = [b for b in alone.client_busy() if b is not None]
    half = level // 2
    each_client = waves * half

    def inputs(r: int) -> tuple[list[dict[str, Any]], SecondJob]:
        job = SecondJob(
            t.source,
            t.ep.api_base + "/completions",
            t.ep.model,
            tuple(t.make(f"{tag} run{r} second", each_client)),
            level - half,
            t.prompt_len,
            output,
            t.keep_alive,
            dict(t.extra),
            dict(t.ep.headers),
        )
        return t.bodies(t.make(f"{tag} run{r} servelab", each_client), output), job

    def each(r: int, run: SharedRun, mine: dict[str, float], second: dict[str, float]) -> None:
        print(
            f"  c{level} x{waves} shared run {r}: TTFT median {mine['median_ttft_ms']:.2f} vs "
            f"{second['median_ttft_ms']:.2f} ms, mean {mine['mean_ttft_ms']:.2f} vs "
            f"{second['mean_ttft_ms']:.2f} ms, "
            f"{_deciles(run)}; TPOT "
            f"{mine['median_tpot_ms']:.3f} vs {second['median_tpot_ms']:.3f} ms, mean "
            f"{mine['mean_tpot_ms']:.3f} vs {second['mean_tpot_ms']:.3f} ms (servelab vs "
            f"vLLM's function); servelab's side valid: {not run.servelab.invalid_reasons(0.0)}",
            file=sys.stderr,
            flush=True,
        )

    pairs = paired_runs(
        t.ep, runs, inputs, t.prompt_len, half, output, timeout_s=timeout_s, each=each, gap_s=gap_s
    )
    checks = pairs.checks
    return {
        "level": level,
        "waves": waves,
        "requests_per_client": each_client,
        "gap_s": gap_s,
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


def stand_in_target(ep: Endpoint) -> Target:
    return Target(
        ep,
        4,
        lambda salt, k: [f"{salt} {i}" for i in range(k)],
        lambda texts, output: [completion_payload("scripted", x, output) for x in texts],
    )


def engine_target(base_url: str, profile_name: str, prompt_len: int, source: str | None) -> Target:
    """A running engine of the named profile's kind (its model name, tokenize dialect, body
    fields and connection policy), with exact-length prompts counted by its /tokenize."""
    profile = load_named([profile_name], default_profile_dirs())[0]
    traits = traits_of(profile)
    ep = Endpoint(base_url=base_url, model=profile.model.served_name, profile=profile)
    settings = workloads.Settings(
        token_ids=traits.token_ids,
        ignore_eos=traits.ignore_eos,
        extra_body=traits.measured_extra,
        progress=False,
    )
    prompts = workloads.Prompts(ep)
    workloads.warm_up(
        ep, prompts, requests=2, prompt_tokens=prompt_len, output_tokens=8, settings=settings
    )
    return Target(
        ep,
        prompt_len,
        lambda salt, k: prompts.make(prompt_len, salt, k),
        lambda texts, output: workloads.payloads(ep, texts, output, settings),
        source,
        traits.keep_alive,
        second_extra(dict(traits.measured_extra)),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--levels",
        nargs="+",
        default=["64:33.1", "256:46.8"],
        help="CONCURRENCY:ITL_MS pairs (the stand-in's gap at that level); with --base-url, "
        "CONCURRENCY alone",
    )
    ap.add_argument("--ttft-ms", type=float, default=20.0, help="the stand-in's TTFT")
    ap.add_argument("--base-url", default=None, help="a running engine instead of the stand-in")
    ap.add_argument(
        "--profile",
        default="cuda-llamacpp-smollm2",
        help="with --base-url: the profile whose engine kind and model it serves",
    )
    ap.add_argument("--prompt", type=int, default=64, help="with --base-url: prompt tokens")
    ap.add_argument(
        "--request-func",
        default=os.environ.get("SERVELAB_VLLM_REQUEST_FUNC"),
        help="vLLM's endpoint_request_func.py where vLLM is not installed",
    )
    ap.add_argument("--output", type=int, default=32, help="tokens a request")
    ap.add_argument("--runs", type=int, default=5, help="shared runs a level")
    ap.add_argument(
        "--waves",
        type=int,
        nargs="+",
        default=[2],
        help="requests a client, in multiples of its streams (the suite's test: at least 2 and "
        "at least 128 requests, so 4 at c64 and 2 at c256)",
    )
    ap.add_argument("--gap-ms", type=float, default=GAP_S * 1e3, help="first requests' spacing")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []

    def measure(t: Target, level: int, script: dict[str, float] | None) -> None:
        for waves in args.waves:
            row = level_figures(
                t, level, args.output, args.runs, waves, args.gap_ms / 1e3, args.timeout_s
            )
            row["script"] = script
            rows.append(row)

    for spec in args.levels:
        level_s, _, itl_s = spec.partition(":")
        level = int(level_s)
        if args.base_url:
            measure(
                engine_target(args.base_url, args.profile, args.prompt, args.request_func),
                level,
                None,
            )
            continue
        script = {
            "ttft_ms": args.ttft_ms,
            "itl_ms": float(itl_s),
            "output_tokens": float(args.output),
        }
        with scripted_server.process(args.ttft_ms, float(itl_s)) as ep:
            measure(stand_in_target(ep), level, script)
    print(
        "| c | requests a client | server | servelab alone: TTFT, TPOT ms, busy | median TTFT ms "
        "servelab / vLLM's (pairs' median, tolerance) | mean TTFT ms (same) | median TPOT ms "
        "(same) | mean TPOT ms (same) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, s, v = r["alone"], r["servelab"], r["vllm_request_func"]
        d, t = r["pairs_median_diff"], r["tolerance"]
        busy = "n/a" if a["client_busy"] is None else f"{a['client_busy']:.0%}"
        sc = r["script"]
        server = (
            f"{args.profile} at {args.base_url}"
            if sc is None
            else f"stand-in {sc['ttft_ms']:g} / {sc['itl_ms']:g} ms"
        )
        cells = [
            f"{s[k]:.{p}f} / {v[k]:.{p}f} ({d[k]:+.2%}, ±{t[k]:.1%})"
            for k, p in (
                ("median_ttft_ms", 2),
                ("mean_ttft_ms", 2),
                ("median_tpot_ms", 3),
                ("mean_tpot_ms", 3),
            )
        ]
        print(
            f"| {r['level']} | {r['requests_per_client']} | {server} | "
            f"{a['median_ttft_ms']:.2f}, {a['median_tpot_ms']:.3f}, {busy} | "
            + " | ".join(cells)
            + " |"
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
