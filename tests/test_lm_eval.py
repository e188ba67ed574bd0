"""lm-evaluation-harness against a real server, offline: local-completions finds the tokenizer
through the server (/tokenizer_info, /tokenize) given only base_url and the model name, and its
loglikelihoods match the model run in-process. Skips when lm-eval[api] is not installed."""

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from models.checkpoint import default_model_dir, load_checkpoint

from .live import serve

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'lm-eval[api]')")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DOCS = [
    {"context": "def add(a, b):\n    return", "continuation": " a + b"},
    {"context": "import os\nimport", "continuation": " sys"},
    {"context": 'if __name__ == "__main__":\n   ', "continuation": " main()"},
    {"context": "class Foo(object):\n    def __init__(self", "continuation": "):"},
    {"context": "for i in range(10):\n    print(", "continuation": "i)"},
]

TASK = """\
task: engram_local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _in_process(docs: list[dict]) -> list[float]:
    """Sum of continuation-token logprobs, split into context/continuation as lm-eval does."""
    model, tok = load_checkpoint()
    out = []
    for d in docs:
        ctx, cont = d["context"], d["continuation"]
        n = len(ctx) - len(ctx.rstrip())  # lm-eval moves trailing spaces to the continuation
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole, ctx_ids = tok.encode(ctx + cont), tok.encode(ctx)
        cont_ids = whole[len(ctx_ids) :]
        with torch.no_grad():
            lp = torch.log_softmax(model.forward_full(torch.tensor([whole]))[0].float(), -1)
        rows = range(len(whole) - len(cont_ids) - 1, len(whole) - 1)
        out.append(sum(lp[r, t].item() for r, t in zip(rows, cont_ids)))
    return out


def test_lm_eval_loglikelihood_task_offline(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    with serve(default_model_dir(), served_model_name=["engram-stdlib"], max_num_seqs=4) as srv:
        max_len = httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"]
        args = f"base_url={srv.url}/v1/completions,model=engram-stdlib,max_length={max_len}"
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions"]
            + ["--model_args", args, "--tasks", "engram_local_ll"]
            + ["--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")]
            + ["--log_samples"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Using remote tokenizer backend" in run.stderr  # not a hub download
    (samples,) = (tmp_path / "out").rglob("samples_engram_local_ll_*.jsonl")
    got = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        got[s["doc_id"]] = float(s["filtered_resps"][0][0])
    assert sorted(got) == list(range(len(DOCS)))
    want = _in_process(DOCS)
    for i, w in enumerate(want):
        assert got[i] == pytest.approx(w, abs=1e-4), (DOCS[i], got[i], w)
