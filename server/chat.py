"""``POST /v1/chat/completions``: render the messages with the chat template, then run the
prompt as a completion and answer in the chat shapes (messages, role/content deltas)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from engine.async_engine import AsyncEngine
from models.tokenizer import EngramTokenizer

from .chat_protocol import ChatCompletionRequest, chat_body, chat_logprobs
from .chat_template import TemplateError, render
from .completions import ClientGone, Completion, error_events, json_text
from .protocol import APIError

log = logging.getLogger("engram.server")


def no_template(model_name: str) -> APIError:
    """A model without a chat template answers every chat request with this (a request's own
    ``chat_template`` overrides a model's template; it does not give one to a model that has
    none, so the OpenAPI document can say which models accept chat)."""
    return APIError(
        400,
        f"model `{model_name}` has no chat template; use /v1/completions, or start the server "
        "with --chat-template FILE",
        "messages",
        "chat_template_missing",
    )


def read_template_file(path: str | None) -> str | None:
    """--chat-template FILE's text (None: the model's own template)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--chat-template {path}: no such file")
    return p.read_text()


def model_template(tok: EngramTokenizer | None, server_template: str | None) -> str | None:
    """The template a request without its own ``chat_template`` gets."""
    if server_template is not None:
        return server_template
    return tok.files.chat_template if tok is not None else None


def chat_prompt(
    req: ChatCompletionRequest, tok: EngramTokenizer, default: str | None, model_name: str
) -> str:
    """The prompt text of a chat request (APIError 400 when it cannot be rendered)."""
    if default is None:
        raise no_template(model_name)
    source = req.chat_template or default
    special = {
        k: v
        for k, v in (("bos_token", tok.files.bos_token), ("eos_token", tok.files.eos_token))
        if v is not None
    }
    try:
        return render(
            source,
            req.template_messages(),
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            special_tokens=special,
            kwargs=req.chat_template_kwargs,
        )
    except TemplateError as e:
        raise APIError(400, str(e), "messages") from e


class ChatCompletion(Completion):
    def __init__(
        self,
        engine: AsyncEngine,
        req: ChatCompletionRequest,
        model_name: str,
        sampling_defaults: dict | None,
        template: str | None,
    ) -> None:
        tok = engine.tokenizer
        text = chat_prompt(req, tok, template, model_name)
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        if not ids:
            raise APIError(400, "the rendered chat prompt encodes to no tokens", "messages")
        self.chat = req
        super().__init__(engine, req.completion(ids), model_name, sampling_defaults)
        self.id = f"chatcmpl-{self.id.removeprefix('cmpl-')}"

    def _chat_logprobs(self, entries: list) -> dict | None:
        if not self.chat.logprobs:
            return None
        return chat_logprobs(entries, self._token_text, lambda s: list(s.encode("utf-8")))

    async def collect(self) -> dict:
        async for choice, delta in self.deltas():
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs
            choice.finish_reason = delta.finish_reason or choice.finish_reason
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "tool_calls": []},
                "logprobs": self._chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": None,
            }
            for c in self.choices
        ]
        return chat_body(self.id, self.model_name, choices, self.usage(), self.created, False)

    async def stream(self) -> AsyncIterator[str]:
        def chunk(choices, usage_=None) -> str:
            body = chat_body(self.id, self.model_name, choices, usage_, self.created, True)
            return f"data: {json.dumps(body)}\n\n"

        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and opts.continuous_usage_stats
        try:
            for c in self.choices:  # the role first, one chunk per choice, as vLLM
                delta = {"role": "assistant", "content": ""}
                first = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
                yield chunk([first], self.choice_usage(c) if continuous else None)
            # the usual chunk (no logprobs, no per-chunk usage) from a template: the same bytes
            # as json.dumps of its body; a batch's events are written at once
            plain = not self.chat.logprobs and not continuous
            head = self.sse_prefix(
                chat_body(self.id, self.model_name, [], None, self.created, True)
            )
            async for batch in self.delta_batches():
                out: list[str] = []
                for choice, delta in batch:
                    choice.token_ids += delta.token_ids
                    if not delta.text and not delta.finish_reason and not self.chat.logprobs:
                        continue
                    content = delta.text or not delta.finish_reason
                    if plain:
                        part = f'{{"content": {json_text(delta.text)}}}' if content else "{}"
                        out.append(
                            f'{head}{{"index": {choice.index}, "delta": {part}, '
                            f'"logprobs": null, "finish_reason": {json_text(delta.finish_reason)}'
                            "}]}\n\n"
                        )
                        continue
                    body = {
                        "index": choice.index,
                        "delta": {"content": delta.text} if content else {},
                        "logprobs": self._chat_logprobs(delta.logprobs),
                        "finish_reason": delta.finish_reason,
                    }
                    out.append(chunk([body], self.choice_usage(choice) if continuous else None))
                if out:
                    yield "".join(out)
            if include_usage:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        except ClientGone:  # nobody to tell
            return
        except Exception as e:  # the status is sent already: the error is the last event
            for line in error_events(e, "chat"):
                yield line
        finally:
            self.abort()
