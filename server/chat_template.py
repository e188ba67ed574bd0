"""Chat templates rendered as Hugging Face renders them (``apply_chat_template``).

The same jinja2 set-up: an immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension and a ``{% generation %}`` block that renders its body; the same
globals (``raise_exception``, ``strftime_now``), a ``tojson`` filter that does not escape HTML;
the variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the special
tokens (``bos_token``, ``eos_token``), then the request's ``chat_template_kwargs``.

Which template: the request's ``chat_template``, else ``--chat-template FILE``, else the
model's (``chat_template.jinja`` or ``tokenizer_config.json``); none is a clear 400.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A template that does not compile or raised while rendering (the client's 400)."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: HF marks assistant text with it; rendering
    keeps the body as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from e


def render(
    source: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    special_tokens: dict | None = None,
    kwargs: dict | None = None,
) -> str:
    """The prompt text for ``messages``. ``continue_final_message``: end the prompt inside the
    last message (its text as written, no end-of-turn), as transformers does."""
    template = compile_template(source)
    variables = {
        "messages": messages,
        "tools": tools,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
        **(special_tokens or {}),
        **(kwargs or {}),
    }
    try:
        text = template.render(**variables)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template raised: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
    if continue_final_message:
        last = messages[-1].get("content") if messages else None
        if not isinstance(last, str) or last.strip() not in text:
            raise TemplateError(
                "continue_final_message: the last message's text is not in the prompt"
            )
        end = text.rindex(last.strip()) + len(last.strip())
        text = text[:end]
    return text
