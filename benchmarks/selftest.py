"""The harness measuring itself on this machine (issue 24, item 4).

Against the scripted stand-in (tests/fakes/scripted_server.py, its own process: the first
token `--ttft-ms` after a request arrives, then one every `--itl-ms`; an honest stand-in, no
engine has exact latencies), it measures:

1. **Reproduction**: servelab's median TTFT, ITL and TPOT at concurrency 1, 4 and 16 against
   the script, and where a TTFT beyond the script went (the request's trip from the client's
   send to the server's read, the server's lateness on its script, each chunk's delivery),
   from the stand-in's own log (CLOCK_MONOTONIC on both sides).
2. **Offered-rate ceiling**: open-loop runs (`workloads.open_loop`, `arrivals.schedule` with
   constant spacing) at rising rates against a short script (`--short-ttft-ms`, a few
   tokens); per rate the offered and achieved start rates, the client's schedule delay
   (p50 / p99 / max of how late it started each request) and failures. The ceiling is the
   highest rate held within 1 % with no failure, below the first rate that is not.

    .venv/bin/python benchmarks/selftest.py --json results/selftest.json

About a minute on 2 cores. Run it on a quiet machine (nothing else measuring): the client
and the stand-in share the cores, and both numbers are about the client.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from servelab import arrivals, selftest, workloads
from servelab.server import Endpoint

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def scripted(ttft_ms: float, itl_ms: float) -> Iterator[Endpoint]:
    cmd = [sys.executable, "-m", "tests.fakes.scripted_server"]
    cmd += ["--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        yield Endpoint(base_url=f"http://127.0.0.1:{port}", model="scripted")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _words(p: object) -> int:
    return len(str(p).split())


def _setup(ep: Endpoint, tag: str) -> tuple[workloads.Prompts, workloads.Settings]:
    s = workloads.Settings(progress=False, check_server_cache=False)
    return workloads.Prompts(ep, count=_words, nonce=tag), s


def reproduction(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with scripted(args.ttft_ms, args.itl_ms) as ep:
        for c in args.levels:
            p, s = _setup(ep, f"rep{c}")
            (run,) = workloads.concurrency_sweep(
                ep,
                levels=[c],
                prompt_tokens=8,
                output_tokens=args.tokens,
                requests_per_level=max(args.requests, 2 * c),
                warmup_requests=1,
                settings=s,
                prompts=p,
            ).values()
            rep = selftest.reproduction(run, args.ttft_ms / 1000, args.itl_ms / 1000)
            log = httpx.get(ep.base_url + "/log").json()
            sp = selftest.split(run, list(log.values()), args.ttft_ms / 1000)
            rows.append(
                {
                    "concurrency": c,
                    "requests": rep.requests,
                    "ttft_ms": rep.ttft_measured_ms,
                    "itl_ms": rep.itl_measured_ms,
                    "tpot_ms": rep.tpot_measured_ms,
                    "ttft_over_ms": rep.ttft_measured_ms - rep.ttft_ms,
                    "trip_ms": sp.trip_ms,
                    "server_late_ms": sp.server_late_ms,
                    "deliver_ms": sp.deliver_ms,
                    "deliver_max_ms": sp.deliver_max_ms,
                    "within_tolerance": not rep.problems,
                    "problems": rep.problems,
                    "invalid": run.invalid_reasons(),
                }
            )
    return rows


def ceiling(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    misses = 0
    with scripted(args.short_ttft_ms, args.short_itl_ms) as ep:
        for rate in args.rates:
            n = max(40, int(rate * args.seconds))
            sched = arrivals.schedule(n, rate, burstiness=math.inf)
            p, s = _setup(ep, f"rate{rate}")
            t = time.perf_counter()
            run = workloads.open_loop(
                ep,
                schedule=sched,
                prompt_tokens=4,
                output_tokens=args.short_tokens,
                settings=s,
                prompts=p,
            )
            f = selftest.fidelity(run, sched)
            rows.append(
                {
                    "rate_rps": rate,
                    "requests": n,
                    "offered_rps": f.offered_rps,
                    "achieved_rps": f.achieved_rps,
                    "share": f.share,
                    "delay_p50_ms": f.delay_ms[0],
                    "delay_p99_ms": f.delay_ms[1],
                    "delay_max_ms": f.delay_ms[2],
                    "failed": f.failed,
                    "held": f.held,
                    "loop_lag_max_ms": max((x.max_ms or 0.0 for x in run.loop_lag), default=0.0),
                    "client_cpu_s": sum(x.cpu_s or 0.0 for x in run.loop_lag),
                    "wall_s": time.perf_counter() - t,
                }
            )
            misses = 0 if f.held else misses + 1
            if misses >= 2:
                break
    return rows


def held_ceiling(rows: list[dict[str, Any]]) -> float | None:
    best = None
    for r in rows:
        if not r["held"]:
            break
        best = r["rate_rps"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ttft-ms", type=float, default=40.0)
    ap.add_argument("--itl-ms", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--short-ttft-ms", type=float, default=5.0)
    ap.add_argument("--short-itl-ms", type=float, default=5.0)
    ap.add_argument("--short-tokens", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="schedule span per rate")
    ap.add_argument(
        "--rates", type=float, nargs="+", default=[10, 25, 50, 100, 200, 400, 800, 1600]
    )
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    label: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "command": " ".join(sys.argv),
    }
    rep = reproduction(args)
    rates = ceiling(args)
    top = held_ceiling(rates)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"servelab self-test, {label['date']}, {label['cores']} cores, load average {load}")
    print(
        f"\nreproduction: scripted TTFT {args.ttft_ms:g} ms, ITL {args.itl_ms:g} ms, "
        f"{args.tokens} tokens (tolerance: TTFT 0..+{selftest.TTFT_OVER_MS:g} ms at c1, "
        f"ITL +/-{selftest.ITL_MS:g} ms, TPOT +/-{selftest.TPOT_MS:g} ms)"
    )
    print(
        "| c | requests | TTFT ms | ITL ms | TPOT ms | TTFT over | trip | server late | "
        "chunk delivery (max) | within |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rep:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['ttft_ms']:.2f} | {r['itl_ms']:.3f} | "
            f"{r['tpot_ms']:.3f} | +{r['ttft_over_ms']:.2f} | {r['trip_ms']:.2f} | "
            f"{r['server_late_ms']:.2f} | {r['deliver_ms']:.2f} ({r['deliver_max_ms']:.1f}) | "
            f"{'yes' if r['within_tolerance'] else 'no'} |"
        )
    print(
        f"\noffered-rate ceiling: open loop, constant spacing, {args.seconds:g} s per rate, "
        f"scripted TTFT {args.short_ttft_ms:g} ms, ITL {args.short_itl_ms:g} ms, "
        f"{args.short_tokens} tokens"
    )
    print(
        "| rate/s | requests | achieved/s | share | delay p50 ms | p99 ms | max ms | failed | "
        "loop lag ms | held |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rates:
        print(
            f"| {r['rate_rps']:g} | {r['requests']} | {r['achieved_rps']:.2f} | "
            f"{r['share'] * 100:.2f}% | {r['delay_p50_ms']:.2f} | {r['delay_p99_ms']:.2f} | "
            f"{r['delay_max_ms']:.2f} | {r['failed']} | {r['loop_lag_max_ms']:.1f} | "
            f"{'yes' if r['held'] else 'no'} |"
        )
    print(f"\nceiling: {top:g} requests/s held within 1 %" if top else "\nceiling: none held")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {"label": label, "reproduction": rep, "rates": rates, "ceiling_rps": top}
        out.write_text(json.dumps(data, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
