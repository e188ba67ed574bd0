"""Server-Sent Events responses whose body chunks skip the middleware stack.

Every middleware between the server and a route here (ours in middleware.py, Starlette's
error and exception layers) wraps ``send`` only to see the response's start message. A stream
sends one body chunk per client per engine step, so :class:`CatchAll` puts the ``send`` it was
given in the scope under :data:`BODY_SEND`, and :class:`EventStream` sends its start message
through the stack as usual and its body chunks straight to that one: the same messages, in the
same order, a few coroutine frames fewer per chunk. A middleware that rewrote bodies (gzip)
would have to go outside CatchAll.
"""

from __future__ import annotations

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

BODY_SEND = "engram.body_send"


class EventStream(StreamingResponse):
    """``text/event-stream`` from an async iterator of ``str`` events."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._body_send = scope.get(BODY_SEND, send)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        body = self._body_send
        async for chunk in self.body_iterator:
            await body({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        await body({"type": "http.response.body", "body": b"", "more_body": False})
