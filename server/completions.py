"""``POST /v1/completions``: validate, submit every prompt x n, collect or stream the result."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request

from engine.async_engine import AsyncEngine, Delta, EngineDead, QueueFull, RequestStream
from engine.sampling import SamplingParams

from .protocol import APIError, CompletionRequest, completion_body, completion_logprobs, usage


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    prompt_text: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def to_params(req: CompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k if req.top_k > 0 else 0,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=list(req.stop or []),
        logprobs=req.logprobs,
        echo=req.echo,
        n=req.n,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        prompt_logprobs=None if req.stream else req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
    )


def encode_prompts(engine: AsyncEngine, req: CompletionRequest) -> list[tuple[list[int], str]]:
    tok, vocab = engine.tokenizer, engine.model.config.vocab_size
    out = []
    for p in req.prompts():
        if isinstance(p, str):
            ids = tok.encode(p)
            if not ids:
                raise APIError(400, "the prompt encodes to no tokens", "prompt")
            out.append((ids, p))
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400, f"token id {bad[0]} is outside the vocab (0..{vocab - 1})", "prompt"
                )
            out.append((list(p), tok.decode(p)))
    return out


def check_length(engine: AsyncEngine, n_prompt: int, max_tokens: int | None) -> int:
    limit = engine.max_tokens_per_seq
    if max_tokens is None:
        max_tokens = limit - n_prompt
    if n_prompt + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def check_min_tokens(min_tokens: int, max_tokens: int) -> None:
    if min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})",
            "min_tokens",
        )


class Completion:
    """One HTTP completion request: its engine requests and how to render their output."""

    def __init__(self, engine: AsyncEngine, req: CompletionRequest, model_name: str) -> None:
        self.engine, self.req, self.model_name = engine, req, model_name
        self.prompts = encode_prompts(engine, req)
        self.max_tokens = [
            check_length(engine, len(ids), req.max_tokens) for ids, _ in self.prompts
        ]
        for mt in self.max_tokens:
            check_min_tokens(req.min_tokens, mt)
        self.created = int(time.time())
        self.id = f"cmpl-{time.time_ns():x}"
        self.subs: list[RequestStream] = []
        n = req.n
        self.choices = [
            Choice(i * n + j, ids, text)
            for i, (ids, text) in enumerate(self.prompts)
            for j in range(n)
        ]

    def submit(self) -> None:
        try:
            for (ids, _), mt in zip(self.prompts, self.max_tokens):
                self.subs.append(self.engine.submit(ids, to_params(self.req, mt)))
        except QueueFull as e:
            self.abort()
            raise APIError(
                429, f"server busy: {e}; retry later", None, "queue_full", {"Retry-After": "1"}
            ) from e
        except EngineDead as e:
            self.abort()
            raise APIError(503, str(e)) from e

    def abort(self) -> None:
        for sub in self.subs:
            self.engine.abort(sub.id)

    async def deltas(self) -> AsyncIterator[tuple[Choice, Delta]]:
        """Merge the sub-requests' deltas until every choice has finished."""
        n = self.req.n
        unfinished = {k: n for k in range(len(self.subs))}
        getters = {asyncio.ensure_future(s.queue.get()): k for k, s in enumerate(self.subs)}
        try:
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    k = getters.pop(fut)
                    delta: Delta = fut.result()
                    if delta.error:
                        raise APIError(500, delta.error, None, "engine_error")
                    if delta.finish_reason:
                        unfinished[k] -= 1
                    if unfinished[k]:
                        getters[asyncio.ensure_future(self.subs[k].queue.get())] = k
                    yield self.choices[k * n + delta.choice], delta
        finally:
            for f in getters:
                f.cancel()

    # --- rendering ----------------------------------------------------------------
    def _token_text(self, tid: int) -> str:
        return self.engine.tokenizer.decode([tid], skip_special_tokens=False)

    def _logprobs(self, choice: Choice, entries: list, echo_prompt: bool) -> dict | None:
        if self.req.logprobs is None:
            return None
        items = []
        if echo_prompt:
            seq = self._seq(choice)
            k = self.req.logprobs  # the prompt's entries may hold more (prompt_logprobs)
            for e, tid in zip(seq.prompt_logprobs, choice.prompt_ids):
                items.append((e if e is None else replace(e, top=e.top[:k]), tid))
        items += [(e, e.token_id) for e in entries]
        offset0 = 0 if self.req.echo else len(choice.prompt_text)
        return completion_logprobs(items, self._token_text, offset0)

    def _seq(self, choice: Choice):
        k, j = divmod(choice.index, self.req.n)
        return self.subs[k].seqs[j]

    def _prompt_logprobs(self, choice: Choice) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token (the first has none) the token and its
        top alternatives, ``{id: {logprob, rank, decoded_token}}``."""
        k = self.req.prompt_logprobs
        out: list[dict | None] = []
        for e in self._seq(choice).prompt_logprobs:
            if e is None:
                out.append(None)
                continue
            entry = {e.token_id: (e.logprob, e.rank)}
            for rank, (tid, lp) in enumerate(e.top[:k], start=1):
                entry.setdefault(tid, (lp, rank))
            out.append(
                {
                    str(tid): {
                        "logprob": max(lp, -9999.0),
                        "rank": rank,
                        "decoded_token": self._token_text(tid),
                    }
                    for tid, (lp, rank) in entry.items()
                }
            )
        return out

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids, _ in self.prompts)
        return usage(prompt, sum(len(c.token_ids) for c in self.choices))

    def choice_usage(self, choice: Choice) -> dict:
        """vLLM's continuous_usage_stats: one choice's counts so far."""
        return usage(len(choice.prompt_ids), len(choice.token_ids))

    async def collect(self) -> dict:
        async for choice, delta in self.deltas():
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs
            choice.finish_reason = delta.finish_reason or choice.finish_reason
        rendered = []
        for c in self.choices:
            text = (c.prompt_text + c.text) if self.req.echo else c.text
            body = {
                "index": c.index,
                "text": text,
                "logprobs": self._logprobs(c, c.logprobs, self.req.echo),
                "finish_reason": c.finish_reason,
            }
            if self.req.prompt_logprobs is not None:
                body["prompt_logprobs"] = self._prompt_logprobs(c)
            rendered.append(body)
        return completion_body(self.id, self.model_name, rendered, self.usage(), self.created)

    async def stream(self) -> AsyncIterator[str]:
        def chunk(choices, usage_=None) -> str:
            body = completion_body(self.id, self.model_name, choices, usage_, self.created)
            return f"data: {json.dumps(body)}\n\n"

        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and opts.continuous_usage_stats  # as vLLM: needs both
        try:
            if self.req.echo:
                for c in self.choices:
                    yield chunk(
                        [
                            {
                                "index": c.index,
                                "text": c.prompt_text,
                                "logprobs": self._logprobs(c, [], True),
                                "finish_reason": None,
                            }
                        ],
                        self.choice_usage(c) if continuous else None,
                    )
            async for choice, delta in self.deltas():
                choice.token_ids += delta.token_ids
                choice.finish_reason = delta.finish_reason or choice.finish_reason
                if not delta.text and not delta.finish_reason and self.req.logprobs is None:
                    continue
                yield chunk(
                    [
                        {
                            "index": choice.index,
                            "text": delta.text,
                            "logprobs": self._logprobs(choice, delta.logprobs, False),
                            "finish_reason": delta.finish_reason,
                        }
                    ],
                    self.choice_usage(choice) if continuous else None,
                )
            if include_usage:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.abort()  # no-op for finished requests; frees a client that went away


async def wait_or_disconnect(request: Request, coro) -> dict | None:
    """Run coro; if the client disconnects first, cancel it and return None."""

    async def disconnected() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    return None
