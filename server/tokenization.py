"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Shapes as vLLM serves them, so clients that ask the server for its tokenizer (lm-eval's
local-completions, benchmark tools) need no model hub. ``/tokenizer_info`` also carries the
whole ``tokenizer.json`` (``tokenizer_json``, a string; vLLM's response allows extra fields) so a
client can rebuild the tokenizer offline.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.async_engine import AsyncEngine
from models.tokenizer import EngramTokenizer

from .chat import chat_prompt, model_template
from .chat_protocol import ChatCompletionRequest
from .openapi import errors
from .protocol import APIError, NonNegative, validation_error

router = APIRouter()


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one: prompt or messages."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # vLLM: True for a prompt, False for messages
    return_token_strs: bool | None = False
    # with messages, as on /v1/chat/completions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[NonNegative]  # strict, as on /v1/completions: true is not a token id


def _tokenizer(request: Request, model: str | None) -> tuple[AsyncEngine, EngramTokenizer]:
    state = request.app.state.server
    if model is not None and model not in state.cfg.model_names:
        raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    engine = state.ready_engine()
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer (its checkpoint has no tokenizer.json)")
    return engine, engine.tokenizer


@router.post("/tokenize", responses=errors(404, 503))
async def tokenize(body: TokenizeRequest, request: Request):
    engine, tok = _tokenizer(request, body.model)
    state = request.app.state.server
    if body.messages is not None:
        default = model_template(tok, state.chat_template)
        if default is None:
            raise APIError(
                400,
                f"model `{state.cfg.model_name}` has no chat template; send `prompt` instead "
                "of `messages`",
                "messages",
                "chat_template_missing",
            )
        fields = ("add_generation_prompt", "continue_final_message", "chat_template")
        chat = {k: getattr(body, k) for k in fields}
        chat.update(chat_template_kwargs=body.chat_template_kwargs, tools=body.tools)
        try:
            req = ChatCompletionRequest.model_validate({"messages": body.messages, **chat})
        except ValidationError as e:
            raise validation_error(list(e.errors())) from None
        req.check()
        text = chat_prompt(req, tok, default, state.cfg.model_name)
        add_special = bool(body.add_special_tokens)  # vLLM: False for messages
    elif body.prompt is None:
        raise APIError(400, "send `prompt` (a string) or `messages`", "prompt")
    else:
        text = body.prompt
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    ids = tok.encode(text, add_special_tokens=add_special)
    return {
        "count": len(ids),
        "max_model_len": engine.max_tokens_per_seq,
        "tokens": ids,
        "token_strs": [tok.id_to_token(t) for t in ids] if body.return_token_strs else None,
    }


@router.post("/detokenize", responses=errors(404, 503))
async def detokenize(body: DetokenizeRequest, request: Request):
    _, tok = _tokenizer(request, body.model)
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise APIError(
            400, f"token id {bad[0]} is outside the vocab (0..{tok.vocab_size - 1})", "tokens"
        )
    return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}


def tokenizer_info(tok: EngramTokenizer, eos_id: int | None, bos_id: int | None, max_len: int):
    """What Hugging Face keeps in tokenizer_config.json (vLLM's answer), plus tokenizer.json."""
    name = lambda i: None if i is None else tok.id_to_token(i)
    added = tok.tokenizer.get_added_tokens_decoder()
    text = tok.to_json()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": name(eos_id),
        "bos_token": name(bos_id),
        "pad_token": None,
        "unk_token": json.loads(text).get("model", {}).get("unk_token"),
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "tokenizer_json": text,
    }


@router.get("/tokenizer_info", responses=errors(503))
async def get_tokenizer_info(request: Request):
    engine, tok = _tokenizer(request, None)
    mc = engine.model.config
    return tokenizer_info(tok, mc.eos_token_id, mc.bos_token_id, engine.max_tokens_per_seq)
