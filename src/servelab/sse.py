"""Incremental Server-Sent Events decoder: bytes in, complete `data` payloads out.

Pure and synchronous (no I/O), so it can be tested by feeding a stream split at every byte.
It follows the SSE framing rules the OpenAI-style streaming endpoints use:

- lines end in ``\\n``, ``\\r\\n`` or ``\\r`` (a ``\\r`` at the end of a chunk is held back
  until the next byte says whether a ``\\n`` follows);
- a blank line ends an event; several ``data:`` lines of one event are joined with ``\\n``;
- one space after the colon is removed; lines starting with ``:`` are comments
  (keep-alive pings) and are only counted;
- other fields (``event``, ``id``, ``retry``) are accepted and ignored.

``[DONE]`` is returned like any other payload: deciding what it means is the client's job.

>>> d = SSEDecoder()
>>> d.feed(b'data: {"a": 1}\\n\\n: ping\\n\\ndata: [DO')
['{"a": 1}']
>>> d.feed(b'NE]\\n\\n')
['[DONE]']
>>> d.comments
1
"""

from __future__ import annotations


class SSEDecoder:
    """Cut a byte stream into SSE event payloads, one ``feed`` call per network read."""

    __slots__ = ("_buf", "_data", "comments", "events")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self.comments = 0  # comment lines seen (keep-alive pings)
        self.events = 0  # events dispatched

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes; return the data payloads of every event completed by them."""
        if (
            not self._buf
            and not self._data
            and chunk.startswith(b"data:")
            and chunk.endswith(b"\n\n")
            and chunk.count(b"\n") == 2
            and b"\r" not in chunk
        ):
            # Fast path: exactly one whole one-line event (what vLLM sends per HTTP chunk).
            value = chunk[5:-2]
            if value[:1] == b" ":
                value = value[1:]
            self.events += 1
            return [value.decode("utf-8", "replace")]
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # A trailing CR may be the first half of CRLF: keep it for the next read.
            hold = buf.endswith(b"\r")
            body = buf[:-1] if hold else buf
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = body.split(b"\n")
            self._buf = lines.pop() + (b"\r" if hold else b"")
        else:
            lines = buf.split(b"\n")
            self._buf = lines.pop()
        out: list[str] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append("\n".join(data))
                    data.clear()
                    self.events += 1
                continue
            first = line[0]
            if first == 0x3A:  # ":" comment
                self.comments += 1
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                data.append(value.decode("utf-8", "replace"))
            # event:/id:/retry: and unknown fields carry nothing the client uses.
        return out

    def close(self) -> list[str]:
        """End of stream: return a last event the server did not terminate with a blank line.

        The SSE specification drops such an event; vLLM's benchmark client accepts it, and so
        does servelab, so a server that omits the final blank line loses no tokens.
        """
        rest = self._buf
        self._buf = b""
        out: list[str] = []
        if rest and rest != b"\r":
            out.extend(self.feed(rest.rstrip(b"\r") + b"\n"))
        if self._data:
            out.append("\n".join(self._data))
            self._data.clear()
            self.events += 1
        return out

    @property
    def pending(self) -> bool:
        """Whether bytes or data lines of an unfinished event are buffered."""
        return bool(self._buf) or bool(self._data)
