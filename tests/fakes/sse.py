"""Wire-format pieces and a threaded localhost server shared by the client, load-generator
and workload tests.

Stand-ins: they speak the same wire format as vLLM (HTTP/1.1 chunked SSE, OpenAI chunk
objects) so servelab's own machinery can be driven into cases a real engine cannot be made
to produce on demand. No figure is ever measured against them.
"""

from __future__ import annotations

import asyncio
import json
import threading
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
