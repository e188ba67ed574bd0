"""Chat: templates rendered as transformers' apply_chat_template renders them, and
/v1/chat/completions through the official openai client (streamed and not) on a Hugging Face
directory whose tokenizer_config.json carries a ChatML template."""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import openai
import pytest

from models.checkpoint import default_model_dir
from server.chat_protocol import ChatCompletionRequest
from server.chat_template import TemplateError, render
from tests.chat_templates import CHATML_TOOLS, CONVERSATIONS, LLAMA3, SYSTEM_FIRST, TOOLS
from tests.hf_models import make_checkpoint, transformers

from .live import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(default_model_dir() / "tokenizer.json"), **SPECIAL
    )


def reference(tok, template, messages, **kwargs):
    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except Exception as e:  # the template raised: ours must raise too
        return e


CASES = [
    (name, template, i, gen, tools, extra)
    for name, template in (("llama3", LLAMA3), ("chatml", CHATML_TOOLS), ("system", SYSTEM_FIRST))
    for i in range(len(CONVERSATIONS))
    for gen in (True, False)
    for tools in (None, TOOLS)
    for extra in ({}, {"enable_thinking": False})
]


@pytest.mark.parametrize("name,template,conv,gen,tools,extra", CASES)
def test_rendered_prompts_equal_transformers(hf_tokenizer, name, template, conv, gen, tools, extra):
    messages = CONVERSATIONS[conv]
    want = reference(
        hf_tokenizer, template, messages, add_generation_prompt=gen, tools=tools, **extra
    )
    kwargs = dict(add_generation_prompt=gen, tools=tools, special_tokens=SPECIAL, kwargs=extra)
    if isinstance(want, Exception):
        with pytest.raises(TemplateError, match="system prompt"):
            render(template, messages, **kwargs)
        return
    assert render(template, messages, **kwargs) == want
    if name == "llama3" and conv == 0:
        assert f"Today is {datetime.now():%Y}." in want  # strftime_now reached the template


def test_text_parts_render_as_their_string():
    parts = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        }
    )
    plain = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "a\nb"}]}
    )
    assert parts.template_messages() == plain.template_messages()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    _, directory = make_checkpoint("qwen3", tmp_path_factory.mktemp("chat") / "qwen3-chat")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML_TOOLS, "eos_token": "<|endoftext|>"})
    )
    return directory


@pytest.fixture(scope="module")
def srv(chat_dir):
    with serve(chat_dir, max_num_seqs=4, max_model_len=256) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def _name(srv):
    return srv.cfg.model_name


def test_chat_equals_a_completion_of_the_rendered_prompt(client, srv):
    tok = httpx.post(srv.url + "/tokenize", json={"messages": MESSAGES}).json()
    r = client.chat.completions.create(
        model=_name(srv), messages=MESSAGES, temperature=0, max_completion_tokens=12
    )
    c = client.completions.create(
        model=_name(srv), prompt=tok["tokens"], temperature=0, max_tokens=12
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == c.choices[0].text
    assert r.usage.prompt_tokens == tok["count"] and r.usage.completion_tokens == 12
    # the tokens of a prompt rendered by hand, without the tokenizer's special tokens
    text = render(CHATML_TOOLS, MESSAGES, add_generation_prompt=True)
    direct = httpx.post(srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert direct.json()["tokens"] == tok["tokens"]


def test_streaming_chat_through_the_openai_client(client, srv):
    whole = client.chat.completions.create(
        model=_name(srv), messages=MESSAGES, temperature=0, max_tokens=10
    )
    chunks = list(
        client.chat.completions.create(
            model=_name(srv),
            messages=MESSAGES,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finished = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finished[-1] == "length" and all(f is None for f in finished[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n_seed_stop_and_logprobs(client, srv):
    name = _name(srv)
    a = client.chat.completions.create(model=name, messages=MESSAGES, n=2, seed=7, max_tokens=8)
    b = client.chat.completions.create(model=name, messages=MESSAGES, n=2, seed=7, max_tokens=8)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    greedy = (
        client.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=12)
        .choices[0]
        .message.content
    )
    stop = greedy[len(greedy) // 2 :][:3]
    cut = client.chat.completions.create(
        model=name, messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[: greedy.index(stop)]
    lp = client.chat.completions.create(
        model=name, messages=MESSAGES, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content) == lp.choices[0].message.content
    assert all(e.logprob <= 0 and e.bytes == list(e.token.encode()) for e in content)


def test_template_overrides_and_refusals(client, srv):
    name = _name(srv)
    r = client.chat.completions.create(
        model=name, messages=MESSAGES, max_tokens=1, extra_body={"chat_template": LLAMA3}
    )
    text = render(LLAMA3, MESSAGES, add_generation_prompt=True)
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.usage.prompt_tokens == ids.json()["count"]
    thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    off = client.chat.completions.create(
        model=name, messages=MESSAGES, max_tokens=1, extra_body=thinking
    )
    on = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=1)
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the empty think block
    bad_role = httpx.post(
        srv.url + "/v1/chat/completions",
        json={"messages": [{"role": "wizard", "content": "x"}]},
    )
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages.0.role"
    raised = httpx.post(
        srv.url + "/v1/chat/completions",
        json={"messages": MESSAGES, "chat_template": "{{ raise_exception('no') }}"},
    )
    assert raised.status_code == 400 and "no" in raised.json()["error"]["message"]
    doc = httpx.get(srv.url + "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "200" in chat["responses"] and "has a chat template" in chat["description"]


def test_chat_template_flag_gives_the_builtin_model_one(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(SYSTEM_FIRST)
    with serve(default_model_dir(), chat_template=str(path), max_num_seqs=2) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None
        refused = httpx.post(
            s.url + "/v1/chat/completions", json={"messages": MESSAGES[1:], "max_tokens": 4}
        )
        assert refused.status_code == 400 and "system prompt" in refused.text
