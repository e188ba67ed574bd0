"""Schema-driven fuzzing: schemathesis reads /openapi.json from a live server and sends what it
generates from it, valid and invalid, over real HTTP. Every response must conform to the
document (status, content type, headers, body schema) and none may be a 5xx; invalid requests
must be refused. Deterministic (derandomized) and bounded to well under two minutes on two
cores: a checkpoint with a 32-token context keeps every generation short."""

import json
import shutil

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

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
REFUSALS = ["400", "401", "404", "405", "413", "429"]
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}}


def test_every_response_conforms_to_the_openapi_document(srv):
    # an explicit config: no schemathesis.toml found on the way up from the working folder
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", config=config)
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "GET /v1/models/{model}"}
    doc = requests.get(srv.url + "/openapi.json", timeout=10).json()
    for op in operations:
        spec = doc["paths"][op.path][op.method.lower()]
        # invalid data needs a body to break (any string is a valid path segment)
        modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * ("requestBody" in spec)
        for mode in modes:

            @settings(
                max_examples=EXAMPLES.get(op.label, DEFAULT_EXAMPLES),
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                # A schema-valid request may still be refused for what the schema cannot say
                # (a prompt longer than the context, a token id past the vocab): 400, not 2xx.
                case.call_and_validate(
                    base_url=srv.url, session=session, excluded_checks=[positive_data_acceptance]
                )

            check()
