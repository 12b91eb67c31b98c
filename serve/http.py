"""uvicorn's httptools protocol, writing each response's head with its first body chunk: one write.

uvicorn writes the status line and headers when the application sends ``http.response.start`` and
the body when it sends ``http.response.body``: two writes to the socket, two segments on the wire,
for every answer with a body. :class:`OneWriteProtocol` (``uvicorn.run(..., http=...)``) gives each
request's cycle a transport that holds the head until the first body chunk and sends both at once;
the rest of the exchange is uvicorn's own. One-input hits under wrk, the server on one core:
19.7k -> 23.3k a second (medians of four interleaved runs, ``bench/README.md``).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _HeadWithBody:
    """A cycle's transport until its response's first body chunk, which is written with the head.

    Writes before the response starts (``100 Continue``) go out at once.
    """

    __slots__ = ("cycle", "head", "transport")

    def __init__(self, cycle: RequestResponseCycle):
        self.cycle, self.transport, self.head = cycle, cycle.transport, b""

    def write(self, data: bytes) -> None:
        if not self.cycle.response_started:
            self.transport.write(data)
        elif not self.head:
            self.head = data
        else:
            self.cycle.transport = self.transport
            self.transport.write(self.head + data)

    def close(self) -> None:  # a response cut short: what it has, then the end
        self.cycle.transport = self.transport
        self.transport.write(self.head)
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, ...: the transport's own
        return getattr(self.transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol whose responses write their head with the first body chunk."""

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        # a new request's cycle (an upgrade makes none); a HEAD answer writes no body: its head goes alone
        if self.cycle is not previous and self.scope["method"] != "HEAD":
            self.cycle.transport = _HeadWithBody(self.cycle)
