"""The ASGI layer around the app (:class:`Gate`): an unexpected exception becomes one logged
traceback and one OpenAI-shaped 500 on a connection that stays usable; the API key is checked
from the headers alone, before any body is read; bodies are bounded, JSON and Unicode."""

from __future__ import annotations

import hmac
import json
import logging
import re

from fastapi.responses import JSONResponse

from .fast import FastRoute, parsed, serve
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("engram.server")

# A JSON escape of a UTF-16 surrogate; a proper pair decodes to one character, so a surrogate
# left in the decoded text is a lone one.
ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
SURROGATE = re.compile("[\ud800-\udfff]")
JSON = b"application/json"


def error_response(e: APIError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.error(e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def bad_unicode_at(value) -> tuple[str, str | None] | None:
    """Where the first string (or key) holding a lone surrogate sits, e.g. ``prompt[1]``, and
    the request field it belongs to."""
    stack = [("", None, value)]
    while stack:
        where, field, v = stack.pop()
        if isinstance(v, str):
            if SURROGATE.search(v):
                return where or "body", field
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                if SURROGATE.search(k):
                    return (f"{where} (a key)" if where else f"field name {ascii(k)}"), field
                stack.append((f"{where}.{k}" if where else k, field or k, x))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", field, x) for i, x in reversed(list(enumerate(v))))
    return None


def unicode_error(body: bytes) -> APIError | None:
    """A 400 naming the field whose text is not valid Unicode (invalid UTF-8 bytes, or a lone
    UTF-16 surrogate written as a JSON escape); None when the body is fine or is not JSON at
    all (the app reports that)."""
    try:
        text, bad_bytes = body.decode("utf-8"), False
    except UnicodeDecodeError:  # the bad bytes become lone surrogates, found below
        text, bad_bytes = body.decode("utf-8", "surrogateescape"), True
    if not bad_bytes and not ESCAPED_SURROGATE.search(body):
        return None
    try:
        found = bad_unicode_at(json.loads(text))
    except (ValueError, RecursionError):
        return APIError(400, "request body is not valid UTF-8") if bad_bytes else None
    if found is None:
        return None
    where, field = found
    why = "bytes that are not UTF-8" if bad_bytes else "a lone UTF-16 surrogate"
    return APIError(400, f"{where}: not valid Unicode ({why})", field, "invalid_unicode")


# Routes behind --api-key: every /v1 path (unknown ones too: they answer 401 without a key, as
# vLLM's do) and the tokenizer endpoints. The rest (health, version, metrics, the OpenAPI
# document and its pages) are open.
KEYED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def needs_key(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in KEYED_PATHS


def json_media_type(content_type: bytes) -> bool:
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == b"application/json" or (
        mime.startswith(b"application/") and mime.endswith(b"+json")
    )


class Gate:
    """The one ASGI layer in front of the app, checks in this order:

    - the API key: ``Authorization: Bearer KEY`` on the routes :func:`needs_key` names, from
      the request line and headers alone, so a request without the key gets its 401 before
      its body is read (no 413 or 400 tells a stranger anything). CORS preflights (OPTIONS)
      pass, as in vLLM.
    - the body (not for GET or HEAD), read once: over ``limit`` bytes (declared or sent) ->
      413; a Content-Type that is not JSON -> 415 (none at all is read as JSON, as curl sends
      it without -H); text that is not valid Unicode -> 400 naming the field (tokenizers and
      JSON encoders raise on lone surrogates); otherwise the body is replayed to the app.
    - the direct routes (``routes``, POST path -> :class:`~server.fast.FastRoute`): a body
      their model takes goes straight to the handler, past FastAPI's router (fast.py).
    - the catch-all: an exception no handler answered is logged once, with its traceback,
      and answered with a 500 in OpenAI's shape. Nothing re-raises it, so the server does not
      log it again nor drop the keep-alive connection.

    One layer, not three: each is a coroutine frame and a ``send`` wrapper every request
    passes through."""

    def __init__(
        self,
        app,
        api_key: str | None,
        limit: int,
        metrics: Metrics | None = None,
        routes: dict[str, FastRoute] | None = None,
    ) -> None:
        self.app, self.key, self.limit, self.metrics = app, (api_key or "").encode(), limit, metrics
        self.routes = routes or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            err, body = self.key_error(scope), b""
            if err is None and scope["method"] not in ("GET", "HEAD"):
                err, scope, receive, body = await self.read_body(scope, receive)
            if err is not None:
                return await error_response(err, self.metrics)(scope, receive, send)
            if receive is None:
                return
            route = self.routes.get(scope["path"]) if scope["method"] == "POST" else None
            request = parsed(route.model, scope, body) if route is not None else None
            if request is not None:
                return await serve(route, request, scope, receive, tracked, self.answer)
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:  # otherwise the response is cut short; nothing more to say
                err = APIError(500, f"internal error: {type(e).__name__}")
                await error_response(err, self.metrics)(scope, receive, send)

    def key_error(self, scope) -> APIError | None:
        if not self.key or scope["method"] == "OPTIONS" or not needs_key(scope["path"]):
            return None
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = auth[7:] if auth[:7].lower() == b"bearer " else b""
        if hmac.compare_digest(given, self.key):
            return None
        return APIError(401, "invalid or missing API key", None, "invalid_api_key")

    def answer(self, e: APIError) -> JSONResponse:
        return error_response(e, self.metrics)

    async def read_body(self, scope, receive):
        """(error or None, the scope, a receive that replays the body, the body); receive
        None when the client went before its body was read (nothing to answer)."""
        why = f"request body over {self.limit} bytes (--max-body-bytes)"
        too_big = APIError(413, why, None, "request_too_large")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return too_big, scope, receive, b""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None, scope, None, b""
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return too_big, scope, receive, b""
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        kind = headers.get(b"content-type")
        if kind is None:
            scope = {**scope, "headers": [*scope.get("headers", []), (b"content-type", JSON)]}
        elif body and not json_media_type(kind):
            shown = kind.decode("latin-1")[:100]
            err = APIError(
                415,
                f"request bodies are JSON: send Content-Type: application/json (got {shown!r})",
                None,
                "unsupported_media_type",
            )
            return err, scope, receive, body
        err = unicode_error(body)
        if err is not None:
            return err, scope, receive, body

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, scope, replay, body
