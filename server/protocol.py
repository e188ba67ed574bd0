"""OpenAI request/response shapes (as vLLM serves them) and the error envelope."""

from __future__ import annotations

import json
import math
import time
from functools import partial
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(
                    self.status, "invalid_request_error" if self.status < 500 else "server_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage on every chunk


def json_int(v):
    """JSON has one number type: 2.0 is the integer 2, as JSON Schema's "integer" says. A
    boolean, a string or 2.5 stays what it is and is refused."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# (limits go before the validator, or the JSON schema shows them as unknown keywords)
JsonInt = BeforeValidator(json_int)
NonNegative = Annotated[int, Field(ge=0), JsonInt]
Count = Annotated[int, Field(ge=1), JsonInt]  # at most --max-num-seqs: /openapi.json says so
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), JsonInt]  # int64, as vLLM bounds it
TopK = Annotated[int, Field(ge=0, le=20), JsonInt]  # logprob alternatives per token
Text = Annotated[StrictStr, Field(min_length=1)]
TokenIds = Annotated[list[NonNegative], Field(min_length=1)]
NoSuffix = Annotated[
    str, WithJsonSchema({"type": "string", "maxLength": 0, "description": "not supported"})
]
# OpenAI's form: token ids as decimal strings -> bias added to the logit, -100..100
LogitBias = Annotated[
    dict[str, float],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        }
    ),
]
Unit = partial(Field, allow_inf_nan=False)  # NaN/Infinity are not numbers the API takes

# vLLM's sampling extensions this server does not implement: only their default (or null) is
# accepted; any other value is refused with a 400 naming the field, never silently ignored.
UNSUPPORTED = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "stop_token_ids": [],
    "include_stop_str_in_output": False,
    "allowed_token_ids": None,
    "bad_words": [],
    "truncate_prompt_tokens": None,
    "logits_processors": None,
    "structured_outputs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "response_format": None,
}


def unsupported(name: str):
    default = UNSUPPORTED[name]
    allowed = [None] if default is None else [None, default]
    shown = json.dumps(default)

    def only_default(v):
        numeric = isinstance(default, float) and type(v) is int  # JSON: 1 is 1.0
        if v is None or v == default and (type(v) is type(default) or numeric):
            return v
        why = "not supported by this server (only {shown} is accepted)"
        raise PydanticCustomError("unsupported", why, {"shown": shown})

    schema = {"enum": allowed, "description": f"vLLM's; not supported: only {shown} or null"}
    return Annotated[Any, BeforeValidator(only_default), WithJsonSchema(schema)]


class CompletionRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI's server does. Types are strict, as OpenAI's are:
    # a boolean is not a token id, "5" is not a number (2.0 is 2: JSON has one number type).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: NonNegative | None = 16  # 0 only with echo: score the prompt
    temperature: float = Unit(1.0, ge=0.0, le=2.0)
    top_p: float = Unit(1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=-1), JsonInt] = -1
    n: Count = 1
    best_of: Count | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: TopK | None = None
    echo: bool = False
    presence_penalty: float = Unit(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Unit(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Unit(1.0, gt=0.0)  # vLLM's: prompt and output tokens
    min_p: float = Unit(0.0, ge=0.0, le=1.0)  # vLLM's: relative to the likeliest token
    logit_bias: LogitBias | None = None
    suffix: NoSuffix | None = None  # refused unless empty
    user: str | None = None
    # vLLM's extensions (README, "Request extensions")
    add_special_tokens: bool = True  # the tokenizer's BOS etc. around a text prompt
    ignore_eos: bool = False
    min_tokens: NonNegative = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: TopK | None = None
    use_beam_search: unsupported("use_beam_search") = None
    length_penalty: unsupported("length_penalty") = None
    stop_token_ids: unsupported("stop_token_ids") = None
    include_stop_str_in_output: unsupported("include_stop_str_in_output") = None
    allowed_token_ids: unsupported("allowed_token_ids") = None
    bad_words: unsupported("bad_words") = None
    truncate_prompt_tokens: unsupported("truncate_prompt_tokens") = None
    logits_processors: unsupported("logits_processors") = None
    structured_outputs: unsupported("structured_outputs") = None
    guided_json: unsupported("guided_json") = None
    guided_regex: unsupported("guided_regex") = None
    guided_choice: unsupported("guided_choice") = None
    guided_grammar: unsupported("guided_grammar") = None
    response_format: unsupported("response_format") = None

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v, info):
        mt = info.data.get("max_tokens")
        if mt is not None and v > mt:
            raise ValueError(f"min_tokens ({v}) must be at most max_tokens ({mt})")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs(cls, v, info):
        if v and info.data.get("stream"):  # as vLLM: nothing to put them in a chunk
            raise ValueError("prompt_logprobs are not available when stream=true")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit():
                raise PydanticCustomError("bias_key", "keys must be token ids (decimal strings)")
            if not -100 <= bias <= 100:  # also refuses NaN
                raise PydanticCustomError("bias_value", "biases must be numbers from -100 to 100")
        return v

    def check(self) -> None:
        """APIError 400 for combinations the fields alone cannot refuse."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 unless echo is true", "max_tokens")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(
                400, f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of"
            )
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise APIError(400, "best_of > n cannot be streamed; set stream to false", "best_of")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# Fields whose type is a union: pydantic reports one error per alternative; when none is more
# specific than a wrong type, the message says which shapes the field takes.
SHAPES = {
    "prompt": "a non-empty string, a list of them, a list of token ids (integers >= 0), "
    "or a list of token-id lists",
    "stop": "a non-empty string or a list of at most 4 of them",
}


def validation_error(errors: list[dict]) -> APIError:
    """One 400 from pydantic's errors: each field once, named as the client wrote it."""
    parts, param, seen = [], None, set()
    for er in errors:
        loc = [x for x in er.get("loc", ()) if x != "body"]
        if er.get("type") == "json_invalid":  # loc holds a character offset, not a field
            reason = (er.get("ctx") or {}).get("error", "")
            where = loc[-1] if loc else "?"
            parts.append(f"request body is not valid JSON (at character {where}: {reason})")
            continue
        field = str(loc[0]) if loc else ""
        if field in seen:
            continue
        if field in SHAPES:  # the alternative that got furthest, or the shapes it takes
            alts = [e for e in errors if e.get("loc", ())[1:2] == (field,)]
            er = max(alts, key=lambda e: (not e["type"].endswith("_type"), len(e["loc"])))
            loc = [field, *er["loc"][3:]]
            if er["type"].endswith("_type") and len(loc) == 1:
                er = {**er, "msg": f"must be {SHAPES[field]}"}
        seen.add(field)
        param = param or field or None
        where = field + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
        parts.append(f"{where or 'body'}: {er.get('msg')}")
    return APIError(400, "; ".join(parts[:5]) or "invalid request", param)


def finite(logprob: float) -> float:
    """JSON has no -Infinity: a token with probability 0 reports -9999.0, as OpenAI does."""
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(entries: list, token_text, offset0: int) -> dict:
    """The legacy completions logprobs object from TokenLogprobs entries (None = no logprob)."""
    tokens, lps, tops, offsets = [], [], [], []
    off = offset0
    for e, tid in entries:
        text = token_text(tid)
        tokens.append(text)
        offsets.append(off)
        off += len(text)
        if e is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(finite(e.logprob))
            tops.append({token_text(t): finite(lp) for t, lp in e.top} if e.top else {})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_body(
    rid: str, model: str, choices: list[dict], usage: dict | None, created: int | None = None
) -> dict[str, Any]:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
