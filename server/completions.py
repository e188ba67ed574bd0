"""``POST /v1/completions``: validate, submit every prompt x n, collect or stream the result."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring_ascii

from fastapi import Request

from engine.async_engine import (
    AsyncEngine,
    Delta,
    Draining,
    EngineDead,
    NeverFits,
    QueueFull,
    RequestStream,
)
from engine.sampling import BadParams, SamplingParams

from .protocol import APIError, CompletionRequest, completion_body, completion_logprobs, usage

log = logging.getLogger("engram.server")


class ClientGone(Exception):
    """The client disconnected mid-stream: the stream ends without another event."""


# put on a request's queue when its client goes (Completion.gone): wakes the stream reading it
GONE = Delta(-1, finish_reason="abort")


def shutting_down(message: str) -> APIError:
    """503 for a request the server will not run because it is shutting down: retry elsewhere."""
    return APIError(503, message, None, "shutting_down", {"Retry-After": "1"})


@dataclass
class Choice:
    index: int  # as rendered (best_of: reassigned once the best n are known)
    prompt: int  # which prompt (sub-request) and which of its sequences
    seq: int
    prompt_ids: list[int]
    given_text: str | None  # the prompt as sent; None for token ids (decoded when needed)
    decode: Callable[[list[int]], str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def prompt_text(self) -> str:
        """The prompt's text: echo and text offsets need it, a plain stream never does."""
        if self.given_text is None:
            self.given_text = self.decode(self.prompt_ids)
        return self.given_text


def sampling_fields(req, defaults: dict | None) -> dict:
    """temperature, top_p, top_k, min_p, repetition_penalty: the request's where it sets them,
    else the model's generation_config.json defaults (as vLLM applies them), else ours."""
    defaults = defaults or {}
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {
        n: defaults[n] if n in defaults and n not in req.model_fields_set else getattr(req, n)
        for n in names
    }
    out["top_k"] = out["top_k"] if out["top_k"] > 0 else 0
    return out


def to_params(
    req: CompletionRequest, max_tokens: int, defaults: dict | None = None
) -> SamplingParams:
    best_of = req.best_of or req.n
    logprobs = req.logprobs
    if best_of > req.n and logprobs is None:
        logprobs = 0  # ranking needs each token's logprob; not rendered
    return SamplingParams(
        max_tokens=max_tokens,
        **sampling_fields(req, defaults),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        stop=req.stops,
        logprobs=logprobs,
        echo=req.echo,
        n=best_of,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        prompt_logprobs=None if req.stream else req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
    )


def encode_prompts(
    engine: AsyncEngine, req: CompletionRequest
) -> list[tuple[list[int], str | None]]:
    """Each prompt's token ids and its text (None for token ids: decoded only if needed)."""
    tok, vocab = engine.tokenizer, engine.model.config.vocab_size
    out = []
    for p in req.prompts():
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=req.add_special_tokens)
            if not ids:
                raise APIError(400, "the prompt encodes to no tokens", "prompt")
            out.append((ids, p))
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400, f"token id {bad[0]} is outside the vocab (0..{vocab - 1})", "prompt"
                )
            out.append((list(p), None))
    return out


def check_length(engine: AsyncEngine, n_prompt: int, max_tokens: int | None) -> int:
    limit = engine.max_tokens_per_seq
    if max_tokens is None:
        max_tokens = limit - n_prompt
    if n_prompt + max_tokens > limit:
        why = ""
        if limit < engine.max_context:  # the KV pool, not the model, is what is short
            why = f" (the KV cache: --kv-blocks {engine.cache.num_blocks} hold {limit} tokens)"
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens{why}. However, you "
            f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
            "for the completion). Please reduce the length of the prompt or max_tokens.",
            "prompt" if n_prompt >= limit else "max_tokens",
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

    def __init__(
        self,
        engine: AsyncEngine,
        req: CompletionRequest,
        model_name: str,
        sampling_defaults: dict | None = None,
    ) -> None:
        """``sampling_defaults``: the model's generation_config.json defaults."""
        self.engine, self.req, self.model_name = engine, req, model_name
        self.sampling_defaults = sampling_defaults
        self.prompts = encode_prompts(engine, req)
        self.max_tokens = [
            check_length(engine, len(ids), req.max_tokens) for ids, _ in self.prompts
        ]
        for mt in self.max_tokens:
            check_min_tokens(req.min_tokens, mt)
        self.created = int(time.time())
        self.id = f"cmpl-{time.time_ns():x}"
        self.subs: list[RequestStream] = []
        self.memory: str | None = None  # the Engram memory the request's model names
        self.per_prompt = m = req.best_of or req.n  # sequences run per prompt
        decode = engine.tokenizer.decode
        self.choices = [
            Choice(i * m + j, i, j, ids, text, decode)
            for i, (ids, text) in enumerate(self.prompts)
            for j in range(m)
        ]

    def submit(self) -> None:
        items = [
            (ids, to_params(self.req, mt, self.sampling_defaults))
            for (ids, _), mt in zip(self.prompts, self.max_tokens)
        ]
        try:
            self.subs = self.engine.submit_many(items, self.memory)
        except (BadParams, NeverFits) as e:
            param = "best_of" if e.param == "n" and self.req.best_of else e.param
            raise APIError(400, str(e), param) from e
        except Draining as e:
            raise shutting_down(f"{e}; retry on another replica") from e
        except QueueFull as e:
            raise APIError(
                429, f"server busy: {e}; retry later", None, "queue_full", {"Retry-After": "1"}
            ) from e
        except EngineDead as e:
            raise APIError(503, str(e)) from e

    def abort(self) -> None:
        for sub in self.subs:
            self.engine.abort(sub.id)

    def gone(self) -> None:
        """The client disconnected: abort its requests and wake the stream waiting on them
        (woken whatever the abort does: an abort that raises must not leave it waiting)."""
        try:
            self.abort()
        finally:
            for sub in self.subs:
                sub.queue.put_nowait(GONE)

    async def deltas(self) -> AsyncIterator[tuple[Choice, Delta]]:
        """Merge the sub-requests' deltas until every choice has finished."""
        n = self.per_prompt
        if len(self.subs) == 1:  # one prompt: read its queue, no wait over several
            async for delta in self._one(self.subs[0], n):
                yield self.choices[delta.choice], delta
            return
        unfinished = {k: n for k in range(len(self.subs))}
        getters = {asyncio.ensure_future(s.queue.get()): k for k, s in enumerate(self.subs)}
        try:
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    k = getters.pop(fut)
                    delta: Delta = fut.result()
                    if delta is GONE:
                        raise ClientGone
                    if delta.error:
                        self.abort()  # the request fails as a whole: stop its other prompts
                        if delta.unavailable:
                            raise shutting_down(delta.error)
                        if delta.bad_params:
                            raise APIError(400, delta.error)
                        raise APIError(500, delta.error, None, "engine_error")
                    if delta.finish_reason:
                        unfinished[k] -= 1
                    if unfinished[k]:
                        getters[asyncio.ensure_future(self.subs[k].queue.get())] = k
                    yield self.choices[k * n + delta.choice], delta
        finally:
            for f in getters:
                f.cancel()

    async def _one(self, sub, n: int) -> AsyncIterator[Delta]:
        async for batch in self._one_batches(sub, n):
            for _, delta in batch:
                yield delta

    async def _one_batches(self, sub, n: int) -> AsyncIterator[list[tuple[Choice, Delta]]]:
        """The deltas of one prompt's sequences with their choices, each time all that have
        arrived (a step's, or several steps' when the client reads slower than the engine
        steps)."""
        unfinished, queue, choices = n, sub.queue, self.choices
        while unfinished:
            got: list[Delta] = [await queue.get()]
            while not queue.empty():
                got.append(queue.get_nowait())
            batch = []
            for delta in got:
                if delta is GONE:
                    raise ClientGone
                if delta.error:
                    if batch:
                        yield batch
                    self.abort()
                    if delta.unavailable:
                        raise shutting_down(delta.error)
                    if delta.bad_params:
                        raise APIError(400, delta.error)
                    raise APIError(500, delta.error, None, "engine_error")
                batch.append((choices[delta.choice], delta))
                if delta.finish_reason:
                    unfinished -= 1
                    if not unfinished:
                        break
            yield batch

    def delta_batches(self) -> AsyncIterator[list[tuple[Choice, Delta]]]:
        """:meth:`deltas`, grouped as they arrive, so a stream writes once per step (one
        prompt: its queue's batches, no generator in between)."""
        if len(self.subs) == 1:
            return self._one_batches(self.subs[0], self.per_prompt)
        return self._singles()

    async def _singles(self) -> AsyncIterator[list[tuple[Choice, Delta]]]:
        async for choice, delta in self.deltas():
            yield [(choice, delta)]

    def sse_prefix(self, body: dict) -> str:
        """``data: `` and the JSON of a chunk ``body`` whose last key is an empty "choices",
        up to that list's opening bracket: a chunk's fixed part, serialised once."""
        head = json.dumps(body)
        if not head.endswith(', "choices": []}'):
            raise ValueError("a chunk's choices must be its last key")
        return "data: " + head[:-2]

    # --- rendering ----------------------------------------------------------------
    def _token_text(self, tid: int) -> str:
        return self.engine.tokenizer.decode([tid], skip_special_tokens=False)

    def _logprobs(
        self, choice: Choice, entries: list, echo_prompt: bool, offset0: int | None = None
    ) -> dict | None:
        if self.req.logprobs is None:
            return None
        items = []
        if echo_prompt:
            seq = self._seq(choice)
            k = self.req.logprobs  # the prompt's entries may hold more (prompt_logprobs)
            for e, tid in zip(seq.prompt_logprobs, choice.prompt_ids):
                items.append((e if e is None else replace(e, top=e.top[:k]), tid))
        items += [(e, e.token_id) for e in entries]
        if offset0 is None:
            offset0 = 0 if self.req.echo else len(choice.prompt_text)
        return completion_logprobs(items, self._token_text, offset0)

    def _seq(self, choice: Choice):
        return self.subs[choice.prompt].seqs[choice.seq]

    def best(self) -> list[Choice]:
        """The choices to render: all of them, or with best_of the n of each prompt's
        sequences with the highest cumulative logprob (vLLM's rule), renumbered."""
        n, m = self.req.n, self.per_prompt
        if m == n:
            return self.choices
        out = []
        for k in range(len(self.prompts)):
            group = self.choices[k * m : (k + 1) * m]
            group.sort(key=lambda c: -sum(e.logprob for e in c.logprobs))
            for rank, c in enumerate(group[:n]):
                c.index = k * n + rank
                out.append(c)
        return out

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
        for c in self.best():
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
        echoed: set[int] = set()
        # the usual chunk (no echo, logprobs or per-chunk usage) from a template: the same
        # bytes as json.dumps of its body
        plain = not self.req.echo and self.req.logprobs is None and not continuous
        offsets = {} if plain else {c.index: len(c.prompt_text) for c in self.choices}
        head = self.sse_prefix(completion_body(self.id, self.model_name, [], None, self.created))
        try:
            async for batch in self.delta_batches():
                out: list[str] = []  # the batch's events, written at once
                for choice, delta in batch:
                    if plain:
                        choice.token_ids += delta.token_ids
                        choice.finish_reason = delta.finish_reason or choice.finish_reason
                        if delta.text or delta.finish_reason:
                            out.append(
                                f'{head}{{"index": {choice.index}, '
                                f'"text": {json_text(delta.text)}, "logprobs": null, '
                                f'"finish_reason": {json_text(delta.finish_reason)}}}]}}\n\n'
                            )
                        continue
                    if self.req.echo and choice.index not in echoed:  # prefilled: logprobs in
                        echoed.add(choice.index)
                        lp = self._logprobs(choice, [], True)
                        echo = {"index": choice.index, "text": choice.prompt_text, "logprobs": lp}
                        out.append(
                            chunk(
                                [{**echo, "finish_reason": None}],
                                self.choice_usage(choice) if continuous else None,
                            )
                        )
                    choice.token_ids += delta.token_ids
                    choice.finish_reason = delta.finish_reason or choice.finish_reason
                    if not delta.text and not delta.finish_reason and self.req.logprobs is None:
                        continue
                    lp = self._logprobs(choice, delta.logprobs, False, offsets[choice.index])
                    if lp is not None:
                        offsets[choice.index] += sum(len(t) for t in lp["tokens"])
                    out.append(
                        chunk(
                            [
                                {
                                    "index": choice.index,
                                    "text": delta.text,
                                    "logprobs": lp,
                                    "finish_reason": delta.finish_reason,
                                }
                            ],
                            self.choice_usage(choice) if continuous else None,
                        )
                    )
                if out:
                    yield "".join(out)
            if include_usage:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        except ClientGone:  # nobody to tell
            return
        except Exception as e:  # the status is sent already: the error is the last event
            for line in error_events(e, "completion"):
                yield line
        finally:
            self.abort()  # no-op for finished requests; frees a client that went away


def json_text(value: str | None) -> str:
    """``json.dumps`` of a chunk's text or finish reason, the same bytes (ASCII, escaped),
    without its per-call argument handling: two of these per streamed token."""
    return "null" if value is None else encode_basestring_ascii(value)


def error_events(e: Exception, what: str) -> list[str]:
    """The last SSE events of a stream that failed after its status was sent: the OpenAI
    error body (a 500 for anything but an APIError, logged once), then [DONE]."""
    if not isinstance(e, APIError):
        log.exception("%s stream failed", what)
        e = APIError(500, f"internal error: {type(e).__name__}")
    return [f"data: {json.dumps(e.body())}\n\n", "data: [DONE]\n\n"]


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
