"""``POST /v1/chat/completions`` request and response shapes, as vLLM serves them.

A chat request runs as a completion of its rendered prompt: :meth:`ChatCompletionRequest.
completion` builds that :class:`CompletionRequest` from the fields the client set (so the
model's generation_config.json defaults apply to the rest, as for completions).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from .protocol import (
    APIError,
    CompletionRequest,
    Count,
    JsonInt,
    LogitBias,
    NonNegative,
    Seed,
    StreamOptions,
    Text,
    TopK,
    Unit,
    unsupported,
)

ROLES = ("system", "developer", "user", "assistant", "tool")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # other fields (tool_calls, reasoning_content, ...) go to the template as sent
    model_config = ConfigDict(extra="allow", strict=True)

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    temperature: float = Unit(1.0, ge=0.0, le=2.0)
    top_p: float = Unit(1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=-1), JsonInt] = -1
    n: Count = 1
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: TopK | None = None
    presence_penalty: float = Unit(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Unit(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Unit(1.0, gt=0.0)
    min_p: float = Unit(0.0, ge=0.0, le=1.0)
    logit_bias: LogitBias | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none"] | None = None  # tool calls are not parsed from the output
    # vLLM's chat extensions
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template writes BOS etc. itself
    ignore_eos: bool = False
    min_tokens: NonNegative = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    use_beam_search: unsupported("use_beam_search") = None
    stop_token_ids: unsupported("stop_token_ids") = None
    response_format: unsupported("response_format") = None

    def check(self) -> None:
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise APIError(
                    400,
                    f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}",
                    f"messages.{i}.role",
                )
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )

    def template_messages(self) -> list[dict]:
        """Messages as the template sees them: text parts joined by newlines (vLLM's
        'string' content format), other fields as sent."""
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "\n".join(p.text for p in m.content)
            elif m.content is None:
                d["content"] = None
            out.append(d)
        return out

    def completion(self, prompt_ids: list[int]) -> CompletionRequest:
        """The completion this chat runs: the rendered prompt's ids, the fields the client set."""
        shared = set(CompletionRequest.model_fields) - {"prompt", "logprobs", "max_tokens"}
        body = {k: getattr(self, k) for k in self.model_fields_set & shared}
        if body.get("stream_options") is not None:
            body["stream_options"] = self.stream_options.model_dump()
        max_tokens = self.max_completion_tokens or self.max_tokens
        body["max_tokens"] = max_tokens  # None: the rest of the context, as vLLM's chat
        if self.logprobs:
            body["logprobs"] = self.top_logprobs or 0
        return CompletionRequest.model_validate({**body, "prompt": prompt_ids})


def chat_logprobs(entries: list, token_text, token_bytes) -> dict:
    """OpenAI's chat logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for e in entries:
        text = token_text(e.token_id)
        content.append(
            {
                "token": text,
                "logprob": max(e.logprob, -9999.0),
                "bytes": token_bytes(text),
                "top_logprobs": [
                    {
                        "token": token_text(t),
                        "logprob": max(lp, -9999.0),
                        "bytes": token_bytes(token_text(t)),
                    }
                    for t, lp in e.top
                ],
            }
        )
    return {"content": content}


def chat_body(
    rid: str, model: str, choices: list[dict], usage: dict | None, created: int, chunk: bool
) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None or not chunk:
        body["usage"] = usage
    return body
