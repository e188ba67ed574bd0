"""CUDA-graph decode steps with step N's tokens kept on the device (overlap, ``device_rows``):
the graph buffers and pieces run eagerly on the CPU (the Triton kernels in its interpreter),
step N+1's placeholders take their input ids and Engram rows there. Rows equal the host-hashed
graph path's step by step; tokens, text, stops, aborts and preemption equal steps in series."""

import pytest
import torch

from engine import model_runner
from engine.cuda_graph import DecodeGraphs
from engine.paged_attention import triton_available
from models.checkpoint import load_checkpoint
from tests.test_overlap import _requests, _run
from tests.test_overlap_device_rows import rows_with_and_without

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

GRAPHS = {"attention": "triton", "static_decode": True}  # decode steps take the graph path


@pytest.fixture(scope="module")
def built(tiny_ckpt):
    torch.set_num_threads(1)
    return load_checkpoint(tiny_ckpt)


@pytest.fixture
def graph_steps(monkeypatch):
    """The bucket of each graph step, by how its rows were planned: ``device`` (step N's
    tokens on the device) or ``host``."""
    got = {"device": [], "host": []}
    device, host = model_runner.graph_step, DecodeGraphs.run

    def on_device(graphs, prep, *args, **kwargs):
        got["device"].append(graphs.bucket_for(prep.n))
        return device(graphs, prep, *args, **kwargs)

    def on_host(self, n, *args, **kwargs):
        got["host"].append(self.bucket_for(n))
        return host(self, n, *args, **kwargs)

    monkeypatch.setattr(model_runner, "graph_step", on_device)
    monkeypatch.setattr(DecodeGraphs, "run", on_host)
    return got


def _workload(seed: int, n: int) -> list:
    """``n`` short requests in the tiny checkpoint's vocabulary (the interpreter is slow):
    greedy, seeded, top-p; every other one with logprobs, or with stop strings the tiny model
    writes early on; penalised ones end first (their steps read the tokens on the host), so
    the steps after take them on the device."""
    reqs = []
    for i, (prompt, p) in enumerate(_requests(seed, n)):
        p.max_tokens = 3 if p.presence_penalty or p.repetition_penalty != 1.0 else 8
        p.logprobs = 2 if i % 2 == 0 else None
        p.stop = ["1", "e"] if i % 2 else []
        reqs.append(([1 + t % 511 for t in prompt[:12]], p))
    return reqs


def test_rows_bit_identical_to_the_host_hashed_graph_path(built, graph_steps):
    model, tok = built
    (ta, ra, on), (tb, rb, off) = rows_with_and_without(
        model, tok, "cpu", num_seqs=3, max_tokens=7, max_num_seqs=4, **GRAPHS
    )
    assert on and not off and ta == tb and len(ra) == len(rb) > 5
    for a, b in zip(ra, rb):  # step by step, every layer
        assert a.keys() == b.keys()
        for lid in a:
            assert torch.equal(a[lid], b[lid])
    # the first run's decode steps took the tokens on the device, the second's the host's;
    # 3 sequences in a bucket of 4: a padding row
    assert len(graph_steps["device"]) >= 5 and set(graph_steps["device"]) == {4}
    assert len(graph_steps["host"]) >= len(graph_steps["device"])


def test_tokens_text_stops_identical_to_steps_in_series(built, graph_steps):
    """With penalties, logprobs and stop strings in the mix, preemption (a small KV pool),
    aborts and late joiners (the batch changes buckets)."""
    reqs = _workload(0, 6)
    for _, p in reqs[:2]:  # they stream long enough for the late joiners to come
        p.max_tokens, p.stop = 8, []
    abort = {1: 3, 4: 2}
    kw = dict(max_seqs=4, kv_blocks=8, block_size=4, join_at=2, abort=abort, **GRAPHS)
    a = _run(built, False, reqs, **kw)
    host_only = len(graph_steps["host"])
    b = _run(built, True, reqs, device_rows=True, **kw)
    assert a[:3] == b[:3]
    assert {"stop", "length", "abort"} <= set(a[2].values())
    assert a[2][1] == "abort" and a[2][4] == "abort"
    assert a[3] > 0 and b[3] > 0  # sequences were preempted and recomputed
    # device-side steps in more than one bucket; penalised rows' steps planned on the host
    assert len(set(graph_steps["device"])) > 1 and len(graph_steps["host"]) > host_only
