"""What /openapi.json says: the shapes the server answers with and every status it sends.

The handlers build their bodies as dicts (protocol.py); the models here document them. The
generated document is then completed: every error status the server can send, with OpenAI's
error body, and none it never sends (FastAPI's 422: validation errors are 400 here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    error: str | None = None


class Version(BaseModel):
    version: str


# With stream: true, Server-Sent Events. Before OpenAPI 3.2 the schema of an event stream
# describes one event: its data is a CompletionResponse chunk (new text; the last may carry
# only usage), an ErrorResponse when a fault ends the stream, or the final [DONE].
STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"type": "string"},
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "anyOf": [
                                    {"$ref": "#/components/schemas/CompletionResponse"},
                                    {"$ref": "#/components/schemas/ErrorResponse"},
                                ]
                            },
                        },
                    ]
                },
            },
        }
    }
}

WHY = {
    400: "Invalid request: bad field values, invalid JSON or Unicode, or a request larger "
    "than the server's limits",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    413: "Request body over --max-body-bytes",
    429: "The waiting queue is full; retry after Retry-After seconds",
    500: "An engine or server fault (the server keeps serving)",
    503: "The model is still loading or failed to load",
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it sends beyond the common ones."""
    out: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorResponse, "description": WHY[c]} for c in codes
    }
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return out


def describe(app: FastAPI, key_check: Callable | None = None) -> dict[str, Any]:
    """The OpenAPI document with every status: 500 everywhere, 400 and 413 where there is a
    body, 401 on the routes behind ``key_check``, each with the error schema; no 422."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    keyed = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, APIRoute)
        and any(d.dependency is key_check for d in route.dependencies)
        for method in route.methods
    }
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorDetail"] = ErrorDetail.model_json_schema()
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas["ErrorResponse"].pop("$defs", None)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            responses.pop("422", None)
            codes = {500}
            if "requestBody" in op:
                codes |= {400, 413}
            if (path, method) in keyed:
                codes.add(401)
            json_error = {"application/json": {"schema": ERROR_REF}}
            for code in sorted(codes):
                responses.setdefault(str(code), {"description": WHY[code], "content": json_error})
    return doc
