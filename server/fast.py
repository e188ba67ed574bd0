"""A direct route for the generation endpoints (POST /v1/completions and
/v1/chat/completions), taken by :class:`~server.middleware.Gate` after its checks.

FastAPI's router and dependency solving cost about as much per request as the handler
itself. The direct route does what FastAPI does for these two routes, and no more: the JSON
body (``json.loads``, as Starlette's ``Request.json``) validated by the same pydantic model
in the same mode (``validate_python``, ``from_attributes``, as FastAPI's body field), then the
same handler; an :class:`APIError` it raises becomes the same response the app's exception
handler makes; a dict it returns is encoded as FastAPI encodes one (``jsonable_encoder``,
``JSONResponse``).

Everything else goes to FastAPI, whose answers are the reference: a body that is not a JSON
object, one the model refuses (the 400 names the fields as FastAPI's errors do), a
Content-Type other than plain ``application/json``, a root path. The routes stay registered
with FastAPI for those and for the OpenAPI document.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .protocol import APIError

Handler = Callable[[Any, Request], Awaitable[Any]]


@dataclass(frozen=True)
class FastRoute:
    """A POST route's body model and handler (the function FastAPI also routes to)."""

    model: type[BaseModel]
    handler: Handler


def plain_json(scope: Scope) -> bool:
    """One Content-Type header, ``application/json`` (parameters allowed): the case where
    FastAPI certainly parses the body as JSON."""
    kinds = [v for k, v in scope.get("headers") or [] if k == b"content-type"]
    return len(kinds) == 1 and kinds[0].split(b";", 1)[0].strip().lower() == b"application/json"


def parsed(model: type[BaseModel], scope: Scope, body: bytes) -> BaseModel | None:
    """The validated request, or None where FastAPI must answer."""
    if scope.get("root_path") or not plain_json(scope):
        return None
    try:
        value = json.loads(body)
    except Exception:  # not JSON (or nested past the recursion limit): FastAPI's 400
        return None
    if not isinstance(value, dict):
        return None
    try:
        return model.model_validate(value, from_attributes=True)
    except ValidationError:
        return None


async def serve(
    route: FastRoute,
    body: BaseModel,
    scope: Scope,
    receive: Receive,
    send: Send,
    on_error: Callable[[APIError], Response],
) -> None:
    """Run the handler on a validated body and send its response."""
    try:
        result = await route.handler(body, Request(scope, receive))
    except APIError as e:
        result = on_error(e)
    if not isinstance(result, Response):
        result = JSONResponse(jsonable_encoder(result))
    await result(scope, receive, send)
