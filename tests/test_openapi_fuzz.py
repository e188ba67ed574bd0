"""Schema-driven fuzzing: schemathesis reads /openapi.json from a live server and sends what it
generates from it, valid and invalid, over real HTTP, with every check it has: each response
must conform to the document (status, content type, headers, body schema), none may be a 5xx,
invalid requests must be refused and valid ones accepted (positive-data acceptance). The
document states the limits of this server's model and settings; the few rules JSON Schema
cannot state (sums and comparisons of two fields, listed in the operation's description) are
applied to the valid cases before they are sent, and are tested on their own elsewhere.
Deterministic (derandomized) and bounded to well under two minutes on two cores: a checkpoint
with a 32-token context keeps every generation short."""

import json
import shutil

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from models.tokenizer import EngramTokenizer

from .live import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Examples per operation and mode; the completions endpoint is where the work is.
EXAMPLES = {"POST /v1/completions": 300}
DEFAULT_EXAMPLES = 25


@pytest.fixture(scope="module")
def short_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a 32-token context: any request's generation stays short."""
    path = tmp_path_factory.mktemp("fuzz") / "fuzz-model"
    shutil.copytree(tiny_ckpt, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def srv(short_ckpt):
    with serve(short_ckpt, max_num_seqs=4, max_queue=16, max_body_bytes=16384) as s:
        yield s


# How this server refuses a request: invalid (400), bad key (401), unknown model (404), wrong
# method (405), body over --max-body-bytes (413), queue full (429). Never 422, never a 5xx.
REFUSALS = ["400", "401", "404", "405", "413", "415", "429"]
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}}
ACCEPTANCE = positive_data_acceptance


def within_cross_field_rules(tok: EngramTokenizer, context: int, max_queue: int):
    """The rules of CompletionRequest's description that JSON Schema cannot state, as a test
    of a generated body."""

    def ok(case) -> bool:
        body = case.body if isinstance(case.body, dict) else {}
        if case.path != "/v1/completions" or "prompt" not in body:
            return True
        p = body["prompt"]
        ids = isinstance(p, list) and p and isinstance(p[0], int | float)  # 2.0 is 2 in JSON
        prompts = [p] if isinstance(p, str) or ids else p
        lengths = [len(tok.encode(x)) if isinstance(x, str) else len(x) for x in prompts]
        max_tokens = body.get("max_tokens", 16)
        n = body.get("n", 1)
        best_of = body.get("best_of") or n
        # null max_tokens: the rest of the context, for each prompt
        room = [context - k if max_tokens is None else max_tokens for k in lengths]
        return (
            all(k + r <= context for k, r in zip(lengths, room))
            and all(body.get("min_tokens", 0) <= r for r in room)
            and best_of >= n
            and not (body.get("stream") and best_of > n)
            and len(prompts) * best_of <= max_queue
            and (max_tokens != 0 or body.get("echo") is True)
        )

    return ok


def test_every_response_conforms_to_the_openapi_document(srv, short_ckpt):
    # an explicit config: no schemathesis.toml found on the way up from the working folder
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", config=config)
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "GET /v1/models/{model}"}
    doc = requests.get(srv.url + "/openapi.json", timeout=10).json()
    tok = EngramTokenizer.from_file(short_ckpt / "tokenizer.json")
    rules = within_cross_field_rules(tok, 32, 16)
    for op in operations:
        spec = doc["paths"][op.path][op.method.lower()]
        # invalid data needs a body to break (any string is a valid path segment)
        modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * ("requestBody" in spec)
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                strategy = strategy.filter(rules)

            @settings(
                max_examples=EXAMPLES.get(op.label, DEFAULT_EXAMPLES),
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            # an operation documented to answer only errors (chat without a template) has no
            # valid data to accept
            @given(case=strategy)
            def check(case):
                responses = doc["paths"][case.path][case.method.lower()]["responses"]
                answers = any(code.startswith("2") for code in responses)
                skip = [] if answers or case.meta.generation.mode.is_negative else [ACCEPTANCE]
                case.call_and_validate(base_url=srv.url, session=session, excluded_checks=skip)

            check()
