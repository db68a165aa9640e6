"""A deterministic stand-in server for servelab's self-test (issue 24, item 4).

Honest about what it is: no real engine can produce exact latencies, so this one does, on
purpose. Every streaming /v1/completions request is answered on a script: its first token
chunk `ttft_s` after the request's body arrived, then one chunk every `itl_s`, each at an
absolute deadline (t_received + ttft + i * itl, so late wake-ups never accumulate), then the
usage event and [DONE]. What servelab measures against it is servelab's own error: client
overhead, event-loop lateness and the server's own wake-up lateness (asyncio timers, about a
millisecond at worst; `lateness_s` records each chunk's so a test can tell them apart).

Speaks vLLM's wire format (HTTP/1.1 keep-alive, chunked SSE, OpenAI completion chunks with
`token_ids`, usage with `stream_options.include_usage`, `[DONE]`); /tokenize counts words.
Use in-process (`with ScriptedServer(ttft_s, itl_s) as s: s.port`) or as its own process:

    python -m tests.fakes.scripted_server --ttft-ms 50 --itl-ms 10   # prints "port N"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    from tests.fakes.sse import ThreadedAsyncServer
except ImportError:  # run as a script from elsewhere
    from sse import ThreadedAsyncServer  # type: ignore[no-redef]


def _event(i: int, finish: str | None, text: str | None = None) -> bytes:
    choice = {"index": 0, "text": text or f" w{i}", "token_ids": [i], "finish_reason": finish}
    body = {"id": "cmpl-scripted", "object": "text_completion", "choices": [choice]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ScriptedServer(ThreadedAsyncServer):
    """Streams `max_tokens` chunks: the first `ttft_s` after the request, then every `itl_s`."""

    def __init__(self, ttft_s: float, itl_s: float, mode: str = "ok") -> None:
        super().__init__()
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        # Stand-ins built to break one audit each (servelab.audits): "cache" answers a prompt
        # it has seen 5x sooner and reports its tokens cached; "truncate" streams one token
        # fewer than its usage counts; "batch" changes its output while another request is in
        # flight; "eos" stops at half the length asked unless `ignore_eos` forces it;
        # "noforce" stops there even when `ignore_eos` asks for the whole length.
        self.mode = mode
        self.seen: set[str] = set()
        self.in_flight = 0
        self.requests = 0
        self.lateness_s: list[float] = []  # each chunk's write time past its deadline
        # By prompt: when the request's body arrived and each chunk was written, in
        # CLOCK_MONOTONIC ns (servelab's perf_counter_ns clock on Linux): GET /log.
        self.log: dict[str, dict[str, Any]] = {}

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = next(
                    (
                        int(x.split(b":")[1])
                        for x in head.split(b"\r\n")
                        if x.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                raw = await r.readexactly(n) if n else b""
                t0 = loop.time()
                path = head.split(b" ")[1] if b" " in head else b""
                if head.startswith(b"GET "):
                    page = b'{"data": [{"id": "scripted"}]}' if path == b"/v1/models" else b"{}"
                    page = json.dumps(self.log).encode() if path == b"/log" else page
                    await self._json(w, 200, page)
                    continue
                body: dict[str, Any] = json.loads(raw or b"{}")
                if path == b"/tokenize":
                    count = len(str(body.get("prompt", "")).split())
                    await self._json(w, 200, json.dumps({"count": count}).encode())
                    continue
                if path != b"/v1/completions":
                    await self._json(w, 404, b'{"error": "not here"}')
                    continue
                await self._stream(w, body, t0, loop)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def _json(self, w: asyncio.StreamWriter, code: int, data: bytes) -> None:
        reason = b"OK" if code == 200 else b"Not Found"
        w.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (code, reason, len(data), data)
        )
        await w.drain()

    async def _stream(
        self,
        w: asyncio.StreamWriter,
        body: dict[str, Any],
        t0: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.requests += 1
        k = int(body.get("max_tokens") or 16)
        if not body.get("stream"):
            await self._json(w, 200, json.dumps({"choices": [{"text": "x"}]}).encode())
            return
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        w.write(b"Transfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        prompt_text = str(body.get("prompt", ""))
        ttft_s, cached = self.ttft_s, None
        if self.mode == "cache" and prompt_text in self.seen:
            ttft_s, cached = self.ttft_s / 5, len(prompt_text.split())
        self.seen.add(prompt_text)
        shown = k - 1 if self.mode == "truncate" else k
        early = self.mode == "noforce" or (self.mode == "eos" and not body.get("ignore_eos"))
        if early:
            k = shown = max(1, k // 2)
        writes: list[int] = []
        # loop.time() is time.monotonic(): the same clock as CLOCK_MONOTONIC ns.
        self.log[str(body.get("prompt", ""))] = {"received_ns": int(t0 * 1e9), "writes_ns": writes}
        self.in_flight += 1
        crowded = False
        finish = "stop" if early else "length"
        try:
            for i in range(shown):
                due = t0 + ttft_s + i * self.itl_s
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.lateness_s.append(loop.time() - due)
                writes.append(time.monotonic_ns())
                crowded = crowded or (self.mode == "batch" and self.in_flight > 1)
                text = f" v{i}" if crowded else None
                w.write(_chunked(_event(i, finish if i == k - 1 else None, text)))
                await w.drain()
        finally:
            self.in_flight -= 1
        usage: dict[str, Any] = {"prompt_tokens": len(prompt_text.split()), "completion_tokens": k}
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        tail = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
        w.write(_chunked(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await w.drain()


@contextmanager
def process(ttft_ms: float, itl_ms: float) -> Iterator[Any]:
    """This server in its own process (its own event loop and interpreter), as an Endpoint;
    killed on exit."""
    from servelab.server import Endpoint

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "tests.fakes.scripted_server"]
    cmd += ["--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("port "), line
        yield Endpoint(base_url=f"http://127.0.0.1:{int(line.split()[1])}", model="scripted")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ttft-ms", type=float, required=True)
    ap.add_argument("--itl-ms", type=float, required=True)
    ap.add_argument(
        "--mode", default="ok", choices=["ok", "cache", "truncate", "batch", "eos", "noforce"]
    )
    args = ap.parse_args()
    server = ScriptedServer(args.ttft_ms / 1000, args.itl_ms / 1000, args.mode)
    with server:
        print(f"port {server.port}", flush=True)
        server.thread.join()


if __name__ == "__main__":
    main()
