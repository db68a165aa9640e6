"""A delaying TCP proxy: an honest stand-in for an engine that is slower per generated token.

The client sees exactly what a server spending `delay_s` longer on every token after the
first would send (same bytes, in order, later), though the engine itself is unchanged. Used
by the live verdict check (`perf/test_verdict_live.py`), the interleaved A/B and bisect
stand-ins (`perf/test_ab.py`, `benchmarks/ab_live.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

from servelab.errors import ServelabError
from servelab.server import Endpoint


class DelayProxyError(ServelabError):
    """The delaying proxy could not be set up."""


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 that delays every server-to-client SSE event by `delay_s`.

    Events are cut at the blank line that ends them; bytes are forwarded unchanged and in
    order, so chunked transfer encoding and keep-alive keep working. Event k of a response
    leaves k * `delay_s` after it arrived (the first token is not delayed: TTFT unchanged).
    """

    def __init__(self, host: str, port: int, delay_s: float) -> None:
        if not delay_s >= 0:
            raise DelayProxyError(
                f"delaying proxy to {host}:{port}: delay {delay_s!r} s must be 0 or more"
            )
        self.host, self.port, self.delay_s = host, port, delay_s
        self.listen_port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> DelayingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            # Connections still open (kept alive by the client) are cancelled and run to
            # their end on this loop, so none is left pending when the loop closes.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
            await asyncio.sleep(0)  # let the closed transports let go of their sockets

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(
            self._pipe(c_reader, s_writer, 0.0), self._pipe(s_reader, c_writer, self.delay_s)
        )

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        """Forward bytes; with `delay_s`, event k of a response leaves k * delay_s after it
        arrived, as if the engine spent `delay_s` longer on every token after the first.

        Arrival is stamped by a separate reader task, so time spent holding one event back
        does not postpone the clock of the next (the delay must not compound).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(65536):
                    queue.put_nowait((loop.time(), data))
            except (ConnectionError, OSError):
                pass
            queue.put_nowait((loop.time(), b""))

        reading = asyncio.create_task(read())
        buf = b""
        k = 0
        try:
            while True:
                arrived, data = await queue.get()
                if not data:
                    break
                if not delay_s:
                    writer.write(data)
                    await writer.drain()
                    continue
                if b"HTTP/1." in data:  # a new response on a kept-alive connection
                    k = 0
                buf += data
                while (cut := buf.find(b"\n\n")) >= 0:
                    wait = arrived + k * delay_s - loop.time()
                    k += 1
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(buf[: cut + 2])
                    buf = buf[cut + 2 :]
                    await writer.drain()
                if buf and b"data:" not in buf:  # headers, chunk sizes, non-SSE bodies
                    writer.write(buf)
                    buf = b""
                    await writer.drain()
            if buf:
                writer.write(buf)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            writer.close()


@contextlib.contextmanager
def delayed(endpoint: Endpoint, delay_s: float) -> Iterator[Endpoint]:
    """`endpoint` as seen through a `DelayingProxy` adding `delay_s` to every token after the
    first: the same model, headers and profile, another base URL. With `delay_s` 0 the
    endpoint itself (no proxy in the way: an A/A pair measures the very same path)."""
    if delay_s == 0:
        yield endpoint
        return
    u = urlsplit(endpoint.base_url)
    if u.scheme != "http":
        raise DelayProxyError(
            f"delaying proxy: {endpoint.base_url!r} is not plain http; the proxy reads the "
            "SSE stream it forwards, so it needs an http:// endpoint"
        )
    with DelayingProxy(u.hostname or "127.0.0.1", u.port or 80, delay_s) as proxy:
        yield dataclasses.replace(endpoint, base_url=f"http://127.0.0.1:{proxy.listen_port}")


__all__ = ["DelayProxyError", "DelayingProxy", "delayed"]
