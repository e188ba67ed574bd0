"""What /openapi.json says: the shapes the server answers with and every status it sends.

The handlers build their bodies as dicts (protocol.py); the models here document them. The
generated document is then completed: every error status the server can send, with OpenAI's
error body, and none it never sends (FastAPI's 422: validation errors are 400 here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
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


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict] = []


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = None  # an Engram memory's base model (None: a base name)
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error", "draining"]
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
    415: "A request body that is not JSON (send Content-Type: application/json)",
    429: "The waiting queue is full; retry after Retry-After seconds",
    500: "An engine or server fault (the server keeps serving)",
    503: "The model is still loading or failed to load, or the server is shutting down "
    "(then with Retry-After: retry on another replica)",
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it sends beyond the common ones."""
    out: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorResponse, "description": WHY[c]} for c in codes
    }
    for code in (429, 503):
        if code in out:
            out[code]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return out


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (its model and settings), so the document can
    state it: a request the schema allows is one the server runs."""

    vocab_size: int
    max_model_len: int  # tokens one sequence can hold: prompt + completion
    max_num_seqs: int  # n and best_of
    max_queue: int  # sequences of one request (prompts x best_of)


def token_id_pattern(vocab_size: int) -> str:
    """A regex for the decimal strings 0 .. vocab_size - 1 (leading zeros allowed, as the
    server reads them): the keys of logit_bias."""
    top = str(vocab_size - 1)
    k = len(top)
    alts = ["0"] + ([f"[1-9][0-9]{{0,{k - 2}}}"] if k > 1 else [])
    for i, ch in enumerate(top):
        lo, hi = (1 if i == 0 else 0), int(ch) - 1
        if hi >= lo:
            rest = f"[0-9]{{{k - i - 1}}}" if k - i - 1 else ""
            alts.append(f"{top[:i]}[{lo}-{hi}]{rest}")
    alts.append(top)
    return "^0*(?:" + "|".join(alts) + ")$"


# Rules across fields that JSON Schema cannot state (sums and comparisons of two fields); the
# server refuses a request that breaks one with a 400 naming the field.
COMPLETION_RULES = (
    "Rules across fields (a request that breaks one gets a 400 naming the field): prompt tokens "
    "+ max_tokens <= max_model_len (GET /v1/models) for each prompt; min_tokens <= max_tokens "
    "(null max_tokens: the context left after the prompt); "
    "best_of >= n; best_of > n is not streamed; prompts x best_of (or n) <= --max-queue; "
    "max_tokens 0 only with echo (scores the prompt)."
)


def _nullable(prop: dict) -> dict:
    """The non-null alternative of an ``anyOf: [X, null]`` property (or the property)."""
    for alt in prop.get("anyOf", []):
        if alt.get("type") != "null":
            return alt
    return prop


def complete_completion_request(schema: dict, lim: Limits) -> None:
    """The limits the server's model and settings set, on the generated request schema."""
    props = schema["properties"]
    last_id = lim.vocab_size - 1
    string, strings, ids, id_lists = props["prompt"]["anyOf"]
    strings["maxItems"] = lim.max_queue
    ids["items"]["maximum"] = last_id
    ids["maxItems"] = lim.max_model_len - 1  # a completion needs one token of room
    id_lists["maxItems"] = lim.max_queue
    id_lists["items"]["items"]["maximum"] = last_id
    id_lists["items"]["maxItems"] = lim.max_model_len - 1
    _nullable(props["max_tokens"])["maximum"] = lim.max_model_len - 1
    props["min_tokens"]["maximum"] = lim.max_model_len - 1
    props["n"]["maximum"] = lim.max_num_seqs
    _nullable(props["best_of"])["maximum"] = lim.max_num_seqs
    bias = _nullable(props["logit_bias"])
    bias["propertyNames"] = {"pattern": token_id_pattern(lim.vocab_size)}
    # what JSON Schema can say of two fields: implications between fixed values
    schema["allOf"] = [
        {  # max_tokens 0 scores the prompt: only with echo, and nothing is generated
            "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
            "then": {
                "properties": {"echo": {"const": True}, "min_tokens": {"const": 0}},
                "required": ["echo"],
            },
        },
        {  # prompt logprobs have no place in a stream's chunks
            "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            "then": {"properties": {"prompt_logprobs": {"enum": [None, 0]}}},
        },
    ]
    schema["description"] = COMPLETION_RULES


def describe(
    app: FastAPI,
    limits: Limits | None,
    needs_key: Callable[[str], bool] = lambda path: False,
    chat_template: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document with every status: 500 everywhere, 400, 413 and 415 where there
    is a body, 401 on the paths behind the key, each with the error schema; no 422. Request
    schemas carry the limits of this server's model and settings."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorDetail"] = ErrorDetail.model_json_schema()
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas["ErrorResponse"].pop("$defs", None)
    complete_completion_request(schemas["CompletionRequest"], limits)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        # int64 bounds, exact: FastAPI's document models hold them as floats (2**63 rounded),
        # under which a seed just past the int64 range would read as valid
        seed = _nullable(schemas[name]["properties"]["seed"])
        seed["maximum"], seed["minimum"] = 2**63 - 1, -(2**63)
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = limits.vocab_size - 1
    if chat_template:
        doc["paths"]["/v1/chat/completions"]["post"]["description"] = (
            "this model has a chat template: it renders the messages (a request's "
            "`chat_template` overrides it, `chat_template_kwargs` add variables)"
        )
    else:
        no_chat(doc, schemas)
    for path, ops in doc["paths"].items():
        for op in ops.values():
            responses = op["responses"]
            responses.pop("422", None)
            codes = {500}
            if "requestBody" in op:
                codes |= {400, 413, 415}
            if needs_key(path):
                codes.add(401)
            json_error = {"application/json": {"schema": ERROR_REF}}
            for code in sorted(codes):
                responses.setdefault(str(code), {"description": WHY[code], "content": json_error})
    return doc


def no_chat(doc: dict, schemas: dict) -> None:
    """A model without a chat template: chat requests are refused, whatever they hold, and
    /tokenize takes a prompt only. The document says so."""
    why = (
        "this model has no chat template (start the server with --chat-template FILE): every "
        "chat request is answered 400"
    )
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    chat["description"] = why + " (code chat_template_missing); use /v1/completions"
    chat["responses"].pop("200", None)
    chat["responses"]["400"]["description"] = why
    tok = schemas["TokenizeRequest"]
    tok["required"] = ["prompt"]
    tok["properties"]["prompt"] = {"type": "string", "title": "Prompt"}
    tok["properties"]["messages"] = {"not": {}, "description": why + "; send prompt"}
