"""uvicorn's httptools protocol, writing each response in one piece and answering repeated hits itself.

uvicorn writes the status line and headers when the application sends ``http.response.start`` and
the body when it sends ``http.response.body``: two writes to the socket, two segments on the wire,
for every answer with a body. :class:`OneWriteProtocol` (``uvicorn.run(..., http=...)``) gives each
request's cycle a transport that holds the head until the first body chunk and sends both at once;
the rest of the exchange is uvicorn's own. One-input hits under wrk, the server on one core:
19.7k -> 23.3k a second (medians of four interleaved runs, ``bench/README.md``).

A POST whose body the serving snapshot answered whole before (:attr:`App.reused`; the head's
requests repeat byte for byte) is answered by the protocol once its body is in, in the event loop's
next round as the application's task would be, without starting that task: the reply, its timing
and its count in the metrics are the application's own. The protocol waits for the body before it
starts the application only where nothing is lost by it: a POST to such a route, not pipelined
behind another request, without ``Expect: 100-continue``, with nothing between the protocol and the
application (no access log, no proxy-header middleware: ``serve --quiet``); a body past
:data:`MEMO_BODY` starts the application as it arrives, and while the client does not read its
answers (uvicorn's write flow paused) the application answers and waits for it. One-input hits
under wrk: 20-25k -> 35-41k a second (``bench/README.md``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from querycache.serve.app import MEMO_BODY, App, Reply


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
    """uvicorn's ``httptools`` protocol whose responses write their head with the first body chunk,
    and which answers a request the serving snapshot answered whole before without the application."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        direct = isinstance(self.app, App) and not self.access_log  # nothing would see the request go by
        self.reused = self.app.reused if direct else {}
        self.waiting: tuple[RequestResponseCycle, Any, Callable[[bytes], Reply | None]] | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        reused = self.reused.get(cycle.scope["path"]) if cycle.scope["method"] == "POST" else None
        if reused is None or app is not self.app or not cycle.more_body or cycle.waiting_for_100_continue:
            self._run(cycle, app)
        else:  # its body is on the way: reused when it is in, else the application starts
            self.waiting = cycle, app, reused

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.waiting and len(self.waiting[0].body) > MEMO_BODY:  # too long to be a reused one
            cycle, app, _ = self.waiting
            self.waiting = None
            self._run(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.waiting:  # answered with the loop's other callbacks, as the application's task would be
            self.loop.call_soon(self._reuse, *self.waiting)
            self.waiting = None

    def _reuse(self, cycle: RequestResponseCycle, app: Any, reused: Callable[[bytes], Reply | None]) -> None:
        if cycle.disconnected or self.transport.is_closing():  # gone since (uvicorn marks only its newest cycle)
            return
        # a client not reading its answers: the application's answer waits until it does
        answer = None if self.flow.write_paused else reused(bytes(cycle.body))
        if answer is None:
            self._run(cycle, app)
            return
        # written as uvicorn's cycle writes: its default headers, connection: close where the connection ends
        head = [STATUS_LINE[answer.status]]
        for name, value in (*cycle.default_headers, *answer.headers):
            head += name, b": ", value, b"\r\n"
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += b"\r\n", answer.body
        cycle.response_started = cycle.response_complete = True
        self.transport.write(b"".join(head))
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def _run(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Start the application on ``cycle``; a HEAD answer writes no body: its head goes alone."""
        if cycle.scope["method"] != "HEAD":
            cycle.transport = _HeadWithBody(cycle)  # a reference cycle until the body is written
        super()._start_asgi_task(cycle, app)
