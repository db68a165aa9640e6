"""Wire-format pieces and a threaded localhost server shared by the client, load-generator
and workload tests.

Stand-ins: they speak the same wire format as vLLM (HTTP/1.1 chunked SSE, OpenAI chunk
objects) so servelab's own machinery can be driven into cases a real engine cannot be made
to produce on demand. No figure is ever measured against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any, Self


def chunk(text: str, **extra: Any) -> bytes:
    """One completion token chunk as an SSE event."""
    body = {
        "id": "c",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": None, **extra}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage(prompt: int, completion: int, cached: int | None = None) -> bytes:
    """The trailing usage-only event (`stream_options.include_usage`)."""
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return b"data: " + json.dumps({"choices": [], "usage": u}).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def parts_server(
    parts: Sequence[bytes | float | Exception], status: int = 200
) -> AsyncIterator[str]:
    """A server on 127.0.0.1, on the running loop, that answers every POST with `parts`: bytes
    are written as they come (one HTTP chunk each), a float pauses that many seconds, an
    Exception part resets the connection (the handler aborts its transport mid-body). Yields
    the base URL. A non-200 `status` sends the bytes parts as one plain body."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        if status != 200:
            body = b"".join(p for p in parts if isinstance(p, bytes))
            return web.Response(status=status, body=body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for p in parts:
            if isinstance(p, float):
                await asyncio.sleep(p)
            elif isinstance(p, Exception):
                assert request.transport is not None
                request.transport.abort()
                return resp
            else:
                await resp.write(p)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.2, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server  # the bound port: aiohttp names it only through its sockets
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


class ThreadedAsyncServer:
    """An asyncio TCP server on 127.0.0.1 in its own thread; subclasses implement `_serve`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        # Connection handlers still waiting on a kept-alive socket are cancelled and run to
        # their end here, on this loop: left pending, they are destroyed later by the garbage
        # collector, in whichever test is running then, as unraisable "loop is closed" and
        # "unclosed transport" warnings.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(server.wait_closed())
        self.loop.run_until_complete(asyncio.sleep(0))  # let the closed transports let go
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
