"""A minimal OpenAI-compatible HTTP server: a stand-in, not an engine.

Used only where the point is servelab's own machinery (server pool sharing across xdist
workers), never to produce a performance figure. Every start appends its pid to the file
named by --starts so a test can count how many servers were started.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--starts", required=True)
    args = ap.parse_args()
    with open(args.starts, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"data": [{"id": args.model}]})
            else:
                self._send(404, {"error": self.path})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            self._send(200, {"choices": [{"text": "x", "index": 0}]})

        def log_message(self, *a: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
