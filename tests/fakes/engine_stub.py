"""A stand-in engine process: an OpenAI-compatible streaming server started by a profile.

Honest where it is used: the fault tests exercise servelab's own machinery (the pool, the
watchdog, the signal handling, the client's and the gate's bounds) on faults that a real
engine cannot be made to produce on demand, or only slowly on two cores. It speaks vLLM's
wire format (HTTP/1.1 chunked SSE, OpenAI chunk objects, ``[DONE]``); no figure is ever
measured against it.

``--mode`` picks how streaming requests are answered: ``ok`` (``--tokens`` token chunks,
usage, ``[DONE]``), ``hang`` (200 and headers, then never a first token), ``500``,
``malformed`` (a chunk that is not JSON), ``reset`` (a token, then a TCP reset). A prompt
containing ``HANG`` hangs in every mode. Readiness (``/health``, ``/v1/models``, a
non-streaming 1-token completion) and ``/tokenize`` always work. ``--child`` starts a second
process in the same process group, as vLLM's API server starts its engine core. The pids go
to ``--pids`` (leader first) so a test can check that none survives.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def sse(obj: object) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def token(text: str, finish: str | None = None) -> bytes:
    return sse({"choices": [{"index": 0, "text": text, "token_ids": [7], "finish_reason": finish}]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", default="ok", choices=["ok", "hang", "500", "malformed", "reset"])
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--pids", required=True)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    pids = [str(os.getpid())]
    if args.child:  # the "engine core": lives until its group is killed
        core = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(3600)", "engine-core", args.pids]
        )
        pids.append(str(core.pid))
    with open(args.pids, "w", encoding="utf-8") as f:
        f.write("\n".join(pids) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _json(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {})
            elif self.path == "/v1/models":
                self._json(200, {"data": [{"id": args.model}]})
            else:
                self._json(404, {"error": f"no {self.path} here"})

        def do_POST(self) -> None:
            body: dict[str, Any] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                text = body.get("prompt") or json.dumps(body.get("messages"))
                self._json(200, {"count": len(str(text).split())})
                return
            if not body.get("stream"):
                self._json(200, {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
                return
            self._stream(body)

        def _stream(self, body: dict[str, Any]) -> None:
            mode = "hang" if "HANG" in json.dumps(body) else args.mode
            if mode == "500":
                self._json(500, {"error": {"message": "stand-in engine: internal error"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            if mode == "hang":
                threading.Event().wait()  # accepted, never a first token
            if mode == "malformed":
                self._chunk(token("a"))
                self._chunk(sse(b"{not json"))
            elif mode == "reset":
                self._chunk(token("a"))
                time.sleep(0.05)
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.rfile.close()  # drop the handler's reference: close() really closes
                self.connection.close()  # RST: the connection is reset mid-stream
                return
            else:
                n = int(body.get("max_tokens") or body.get("max_completion_tokens") or args.tokens)
                for i in range(n):
                    self._chunk(token("t", "length" if i == n - 1 else None))
                usage = {"prompt_tokens": 4, "completion_tokens": n}
                self._chunk(sse({"choices": [], "usage": usage}))
            self._chunk(sse(b"[DONE]"))
            self._chunk(b"")

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"stand-in engine ({args.mode}) listening on port {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
