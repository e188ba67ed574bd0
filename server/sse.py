"""Server-Sent Events responses: one task per stream, body chunks straight to the server.

A stream sends one body chunk per client per engine step, so what each chunk passes through
is the HTTP layer's cost per token:

- Every middleware between the server and a route (ours in middleware.py, Starlette's and
  FastAPI's error layers) wraps ``send`` only to see the response's start message.
  :class:`App` puts the ``send`` the server gave in the scope under :data:`BODY_SEND` before
  any of them runs; :class:`EventStream` sends its start message through the stack as usual
  and its body chunks straight to that one: the same messages, in the same order. A
  middleware that rewrote bodies (gzip) would have to go outside App.
- Starlette's StreamingResponse runs the body in a second task beside a disconnect listener
  (an anyio task group per request). Here the body runs in the request's own task; a
  listener waits on ``receive`` and, when the client goes, calls ``on_gone`` (which aborts the
  engine requests and wakes the stream). The server drops sends on a closed connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

BODY_SEND = "engram.body_send"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


class App(FastAPI):
    """FastAPI with the server's own ``send`` kept in the scope for :class:`EventStream`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[BODY_SEND] = send
        await super().__call__(scope, receive, send)


async def disconnected(receive: Receive) -> None:
    """Return once the client has gone (or the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """A ``text/event-stream`` response from an async iterator of ``str`` events.
    ``on_gone()`` runs once if the client disconnects before the last event; it must end the
    iterator soon (the stream reads on until it ends). A Response (FastAPI returns it as it
    is), whose body is the iterator's."""

    def __init__(self, events: AsyncIterator[str], on_gone: Callable[[], None]) -> None:
        self.events, self.on_gone = events, on_gone
        self.status_code, self.background = 200, None
        self.raw_headers = list(HEADERS)

    def _listened(self, watch: asyncio.Future) -> None:
        if not watch.cancelled() and watch.exception() is None:
            self.on_gone()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = scope.get(BODY_SEND, send)
        watch = asyncio.ensure_future(disconnected(receive))
        watch.add_done_callback(self._listened)
        try:
            start = {"type": "http.response.start", "status": self.status_code}
            await send({**start, "headers": self.raw_headers})
            async for event in self.events:
                await body(
                    {"type": "http.response.body", "body": event.encode(), "more_body": True}
                )
            watch.remove_done_callback(self._listened)  # done: a disconnect now changes nothing
            await body({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.remove_done_callback(self._listened)
            watch.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:  # ended early (an exception, a cancelled task): its finally
                await aclose()
