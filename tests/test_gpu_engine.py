"""The engine's CUDA paths: paged kernels, decode CUDA graphs, no host sync in a decode step,
stalls measured with graphs on, the server starting with graphs. Skipped without CUDA; run on
a GPU machine with ``pytest -m gpu``."""

import numpy as np
import pytest
import torch

from engine import determinism
from engine.config import EngineConfig
from engine.cuda_graph import bucket_sizes
from engine.engine import Engine
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.paged_attention import triton_available
from engine.sampling import SamplingParams
from offload.offloaded_model import OffloadedModel
from offload.store import cupy_ok

from .conftest import new_seq, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton"
    ),
]
MAX_SEQS = 8


def _runner(model, graphs: bool) -> ModelRunner:
    cache = KVCache(model.config, 256, 16, MAX_SEQS, device="cuda")
    return ModelRunner(model, cache, attention="triton", decode_graphs=graphs, capture=graphs)


def test_graph_replay_equals_eager_for_every_bucket():
    model = tiny_model(2).to("cuda")
    rng = np.random.default_rng(0)
    for batch in sorted(set(bucket_sizes(MAX_SEQS)) | {3, 5, 7}):
        eager, graphed = _runner(model, False), _runner(model, True)
        assert graphed.graphs is not None and graphed.graphs.capture
        prompts = [
            rng.integers(0, 300, size=int(rng.integers(3, 40))).tolist() for _ in range(batch)
        ]
        runs = []
        for runner in (eager, graphed):
            seqs = [new_seq(runner.cache) for _ in prompts]
            logits = [runner.step(seqs, [list(p) for p in prompts]).clone()]
            tokens = logits[0].argmax(-1).tolist()
            for _ in range(5):  # decode steps: the graphed runner replays
                out = runner.step(seqs, [[t] for t in tokens]).clone()
                logits.append(out)
                tokens = out.argmax(-1).tolist()
            runs.append(torch.cat(logits))
        torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)
        assert graphed.graphs.steps == 5


def test_a_decode_step_makes_no_host_sync():
    model = tiny_model(2).to("cuda")
    runner = _runner(model, True)
    seqs = [new_seq(runner.cache) for _ in range(3)]
    logits = runner.step(seqs, [[1, 2, 3], [4, 5], [6]])
    tokens = logits.argmax(-1).tolist()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits = runner.step(seqs, [[t] for t in tokens])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.graphs.steps == 3 and logits.shape[0] == 3


@pytest.mark.skipif(not cupy_ok(), reason="needs CuPy for the pinned host tier")
@pytest.mark.parametrize("gather", ["uva", "staged"])
def test_stalls_are_accounted_with_graphs_on(gather):
    model = tiny_model(2).to("cuda")
    om = OffloadedModel.from_model(model, "host", gather, device="cuda")
    ref = OffloadedModel.from_model(model, "gpu", "resident", device="cuda")
    outs = []
    for rows in (ref.prefetcher, om.prefetcher):
        engine = Engine(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), rows)
        seqs = [
            engine.add(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0))[0]
            for i, p in enumerate([[1, 2, 3], [4, 5, 6, 7], [8]])
        ]
        engine.run_until_done()
        assert engine.fault is None and engine.runner.graphs.steps >= 10
        outs.append([s.output_ids for s in seqs])
    assert outs[0] == outs[1]
    totals = om.accountant.totals
    assert totals.steps >= 12
    for layer in totals.layers.values():
        assert layer.prefetch_s > 0 and layer.stall_s + layer.slack_s > 0
    om.close()


def test_server_starts_with_graphs_on_the_builtin_model():
    pytest.importorskip("fastapi")
    import httpx

    from server.config import ServerConfig

    from .live import LiveServer

    srv = LiveServer(ServerConfig.make(device="cuda", max_num_seqs=8)).start()
    try:
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"prompt": "def __init__(self", "max_tokens": 16, "temperature": 0},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        graphs = srv.state.engine.engine.runner.graphs
        assert graphs is not None and graphs.capture and graphs.steps >= 15
    finally:
        srv.stop()


# here, not in test_startup.py: GPU machines without the web stack collect this file
def test_deterministic_mode_runs_the_engine_on_the_gpu_and_repeats_it():
    """No op of a step refuses deterministic mode on CUDA (greedy and sampled), and the same
    batch twice gives the same tokens."""
    before = determinism.current()
    model = tiny_model(2).to("cuda")

    def once() -> list[list[int]]:
        eng = Engine(model, EngineConfig(max_num_seqs=4, kv_blocks=16, deterministic=True))
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
        seqs = [eng.add("g", [1, 2, 3, 4, 5], greedy)[0], eng.add("s", [9, 8, 7], sampled)[0]]
        eng.run_until_done()
        assert eng.fault is None
        return [s.output_ids for s in seqs]

    try:
        assert once() == once()
    finally:
        determinism.apply(before)
