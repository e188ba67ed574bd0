"""Many Engram memories on one backbone: --memories, mixed batches, the memories API, LRU.

Memories are made here from the tiny bases as fine-tunes would be (the same backbone bytes,
every Engram tensor redrawn; tests/memories.py), in this project's format and TinyEngram's.
"Alone" is each checkpoint served by itself (its own OffloadedModel on the engine); every
memory's output in a mixed batch through the real server must equal it, token for token.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from bench.memory_copies import make_memory
from engine.generate import generate
from models.tokenizer import EngramTokenizer
from offload.offloaded_model import OffloadedModel
from tests.live import serve
from tests.test_tinyengram import make_tinyengram

N_TOKENS = 12


def alone(directory, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of ``directory`` served by itself (no memories anywhere)."""
    om = OffloadedModel.load(directory, "cpu", progress=False)
    try:
        return generate(om.model, prompts, N_TOKENS, rows=om.prefetcher)
    finally:
        om.close()


def complete(url: str, model: str, prompt: list[int], **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    return httpx.post(
        url + "/v1/completions", json={**body, "ignore_eos": True, **extra}, timeout=120
    )


@pytest.fixture(scope="module")
def ours(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("memories")
    return {
        "base": tiny_ckpt,
        "m1": make_memory(tiny_ckpt, root / "m1", seed=1),
        "m2": make_memory(tiny_ckpt, root / "m2", seed=2),
        "m3": make_memory(tiny_ckpt, root / "m3", seed=3),
    }


@pytest.fixture(scope="module")
def tinyengram(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyengram-memories")
    make_tinyengram(root / "base", seed=0)
    return {"base": root / "base", "t1": make_memory(root / "base", root / "t1", seed=11)}


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, k)] for k in (5, 17, 9, 30)[:n]]


def mixed_equals_alone(dirs: dict, names: list[str], vocab: int, **server) -> dict:
    """Every name (the base first) with every prompt, all at once through one server."""
    prompts = prompts_for(4, vocab)
    want = {n: alone(dirs[n], prompts) for n in names}
    memories = [f"{n}={dirs[n]}" for n in names[1:]]
    jobs = [(n, i) for i in range(len(prompts)) for n in names]  # interleaved
    with serve(
        dirs["base"],
        served_model_name=["base"],
        memories=memories,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        **server,
    ) as srv:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: complete(srv.url, j[0], prompts[j[1]]), jobs))
        listed = httpx.get(srv.url + "/v1/models").json()["data"]
        offload = httpx.get(srv.url + "/v1/offload").json()
        metrics = {
            (family, n): srv.metric(f"engram_memory_{family}_total", f'memory="{n}"')
            for family in ("requests", "generation_tokens", "rows", "bytes", "stall_seconds")
            for n in names
        }
    tok = EngramTokenizer.from_file(dirs["base"])
    for (n, i), r in zip(jobs, got):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == n
        assert body["choices"][0]["text"] == tok.decode(want[n][i]), (n, i)
    for n in names:  # every memory's own series, the base's under its model name
        assert metrics["requests", n] == len(prompts)
        assert metrics["generation_tokens", n] == len(prompts) * N_TOKENS
        assert metrics["rows", n] > 0 and metrics["bytes", n] > 0
    return {"models": listed, "offload": offload, "want": want}


def test_mixed_batch_of_our_memories_equals_each_served_alone(ours):
    out = mixed_equals_alone(ours, ["base", "m1", "m2"], vocab=400)
    # memories differ from each other and from the base (else the check proves nothing)
    w = out["want"]
    assert w["m1"] != w["base"] and w["m2"] != w["m1"]
    cards = {c["id"]: c for c in out["models"]}
    assert cards["base"]["parent"] is None
    assert cards["m1"]["parent"] == "base" and cards["m2"]["parent"] == "base"
    assert cards["m1"]["root"] == str(ours["m1"])
    mem = {m["name"]: m for m in out["offload"]["memories"]}
    assert set(mem) == {"base", "m1", "m2"} and mem["m1"]["version"] == 1
    assert mem["m1"]["accounting"]["steps"] > 0  # its rows came through its own gathers
    assert mem["m1"]["placement"] == "cpu" and mem["m1"]["table_bytes"]["cpu"] > 0


def test_mixed_batch_of_tinyengram_memories_equals_each_served_alone(tinyengram):
    mixed_equals_alone(tinyengram, ["base", "t1"], vocab=200)


def test_max_memories_keeps_one_on_the_device_and_outputs_unchanged(ours):
    out = mixed_equals_alone(ours, ["base", "m1", "m2", "m3"], vocab=400, max_memories=1)
    mem = {m["name"]: m for m in out["offload"]["memories"]}
    assert sum(mem[n]["modules_on_device"] for n in ("m1", "m2", "m3")) <= 1


def test_lru_moves_the_least_recently_used_idle_memory_out(ours):
    """The LRU order itself, on the engine's MemorySet: the memory a step needs comes in,
    the one no recent step read goes out; the base never moves."""
    from engine.memories import MemoryLoader, MemorySet, base_memory
    from engine.model_runner import ModelRunner  # noqa: F401  (the set the runner owns)

    served = OffloadedModel.load(ours["base"], "cpu", progress=False)
    loader = MemoryLoader(served, lambda d, loaded: OffloadedModel.load(d, "cpu", loaded=loaded))
    mems = MemorySet(base_memory("base", served.model, served.prefetcher), "cpu", 2)
    loaded = [loader.load(n, ours[n]) for n in ("m1", "m2", "m3")]
    try:
        for m in loaded:
            mems.install(m)
        m1, m2, m3 = loaded
        assert not any(m.on_device for m in loaded)  # in host memory until a step needs it

        class Seq:
            def __init__(self, memory):
                self.memory = memory

        def step(*memories):
            return mems.groups([Seq(m) for m in memories], np.ones(len(memories), np.int64))

        step(m1)
        step(m2)
        step(mems.base)  # two steps without m1 or m2
        step(mems.base)
        step(m3)  # m1 was used least recently: it goes out
        assert (m1.on_device, m2.on_device, m3.on_device) == (False, True, True)
        groups = step(m1, m3)
        assert [g.memory for g in groups] == [m1, m3]
        assert (m1.on_device, m2.on_device, m3.on_device) == (True, False, True)
        assert mems.evictions == 2 and mems.base.on_device
    finally:
        for m in loaded:
            m.close()
        served.close()


def test_a_memory_of_another_backbone_is_refused_in_one_line(ours, tmp_path, capsys):
    from server.cli import main

    bad = make_memory(
        ours["base"], tmp_path / "bad", seed=5, backbone_change="model.layers.1.mlp.up_proj.weight"
    )
    with pytest.raises(RuntimeError) as err:
        with serve(ours["base"], memories=[f"bad={bad}"]):
            pass
    msg = str(err.value)
    assert "memory 'bad'" in msg and "model.layers.1.mlp.up_proj.weight differs" in msg
    # the command line: malformed, a missing directory, data parallel: one line, exit 1
    for args, says in [
        (["--memories", "nodir"], "write NAME=DIR"),
        (["--memories", f"x={tmp_path / 'none'}"], "does not exist"),
        (["--memories", f"m1={ours['m1']}", "--data-parallel-size", "2"], "not supported"),
    ]:
        assert main(["--model", str(ours["base"]), *args]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines


def _memories(url: str, key: str = "") -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url + "/v1/memories", headers=headers)
    assert r.status_code == 200, r.text
    return {m["name"]: m["version"] for m in r.json()["data"] if not m["retired"]}


def test_bad_memory_requests_are_refused_and_change_nothing(ours, tmp_path):
    corrupt = make_memory(ours["base"], tmp_path / "corrupt", seed=7)
    table = corrupt / "engram.safetensors"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])  # truncated
    mismatch = make_memory(
        ours["base"], tmp_path / "mismatch", seed=8, backbone_change="model.norm.weight"
    )
    key = "sekrit"
    auth = {"Authorization": f"Bearer {key}"}
    with serve(
        ours["base"], served_model_name=["base"], api_key=key, allow_memory_updates=True
    ) as srv:
        post = lambda body: httpx.post(srv.url + "/v1/memories", json=body, headers=auth)
        assert (
            httpx.post(srv.url + "/v1/memories", json={"name": "a", "path": "x"}).status_code == 401
        )
        assert post({"name": "m1", "path": str(ours["m1"])}).status_code == 200
        # the README's multi-tenant use: the official client, the memory as the model
        import openai

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        assert cards["m1"].parent == "base" and cards["base"].parent is None
        prompt = prompts_for(1, 400)[0]
        for tenant in ("base", "m1"):
            got = client.completions.create(
                model=tenant,
                prompt=prompt,
                max_tokens=4,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert got.model == tenant and got.usage.completion_tokens == 4
        start = _memories(srv.url, key)
        assert start == {"base": 1, "m1": 1}
        cases = [
            ({"name": "m2", "path": str(tmp_path / "none")}, 400, "does not exist"),
            ({"name": "m2", "path": str(mismatch)}, 400, "model.norm.weight differs"),
            ({"name": "m1", "path": str(ours["m2"])}, 400, "in use"),
            ({"name": "base", "path": str(ours["m2"])}, 400, "base model's name"),
            ({"name": "m2", "path": str(corrupt)}, 400, "engram.safetensors"),
            ({"name": "m9", "path": str(ours["m2"]), "reload": True}, 404, "m9"),
            ({"name": "m2"}, 400, "path"),
            ({"name": "m 2", "path": str(ours["m2"])}, 400, "without '/' or spaces"),
        ]
        for body, status, says in cases:
            r = post(body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert says in err["message"] and err["type"] == "invalid_request_error", err
            assert _memories(srv.url, key) == start  # the serving set is unchanged
        r = httpx.delete(srv.url + "/v1/memories/m9", headers=auth)
        assert r.status_code == 404 and "m9" in r.json()["error"]["message"]
        body = {"model": "m9", "prompt": [5, 6, 7]}
        gone = httpx.post(srv.url + "/v1/completions", json=body, headers=auth)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert _memories(srv.url, key) == start
        doc = httpx.get(srv.url + "/openapi.json").json()
        assert {"get", "post"} <= set(doc["paths"]["/v1/memories"])
        assert "delete" in doc["paths"]["/v1/memories/{name}"]
    with serve(ours["base"], served_model_name=["base"]) as srv:  # updates not allowed
        r = httpx.post(srv.url + "/v1/memories", json={"name": "m1", "path": str(ours["m1"])})
        assert r.status_code in (404, 405)
        assert _memories(srv.url) == {"base": 1}


def _stream(url: str, model: str, prompt: list[int], started=None) -> tuple[str, int]:
    """A streamed greedy completion: its text and HTTP status; ``started`` is set once the
    first token has arrived."""
    import json

    body = {"model": model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    text = ""
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={**body, "ignore_eos": True, "stream": True},
        timeout=120,
    ) as r:
        if r.status_code != 200:
            return r.read().decode(), r.status_code
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return str(chunk), 500
                text += chunk["choices"][0]["text"]
                if started is not None:
                    started.set()
    return text, 200


def test_load_reload_unload_under_16_streams(ours):
    """16 streams read the base and m1 while m2 loads and unloads and m1 reloads (new tables
    and weights: m3's): no request fails, a stream that started before the reload ends on
    the old version, one sent after it gets the new one; memory returns to where it began."""
    import threading

    prompts = prompts_for(4, 400)
    tok = EngramTokenizer.from_file(ours["base"])
    text = {n: [tok.decode(t) for t in alone(ours[n], prompts)] for n in ("base", "m1", "m3")}
    with serve(
        ours["base"],
        served_model_name=["base"],
        memories=[f"m1={ours['m1']}"],
        allow_memory_updates=True,
        max_num_seqs=16,
        max_num_batched_tokens=256,
    ) as srv:
        mems = srv.state.engine.memories
        held = mems.bytes_held()
        stop = threading.Event()
        results: list[tuple[str, int, str, str, int]] = []  # (model, status, text, phase, i)
        phase = ["before"]

        def worker(k: int) -> None:
            model = "base" if k % 2 else "m1"
            while not stop.is_set():
                i = k % len(prompts)
                sent = phase[0]
                got, status = _stream(srv.url, model, prompts[i])
                results.append((model, status, got, sent + "/" + phase[0], i))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        post = lambda body: httpx.post(srv.url + "/v1/memories", json=body, timeout=120)
        r = post({"name": "m2", "path": str(ours["m2"])})
        assert r.status_code == 200 and r.json()["version"] == 1
        assert complete(srv.url, "m2", prompts[0]).status_code == 200
        # a stream on m1 in flight across the reload
        started = threading.Event()
        long_result = []
        long = threading.Thread(
            target=lambda: long_result.append(_stream(srv.url, "m1", prompts[1], started))
        )
        long.start()
        assert started.wait(60)
        phase[0] = "reloading"
        r = post({"name": "m1", "path": str(ours["m3"]), "reload": True})
        assert r.status_code == 200 and r.json()["version"] == 2
        phase[0] = "after"
        long.join(120)
        assert long_result == [(text["m1"][1], 200)]  # it finished on the version it began
        after = complete(srv.url, "m1", prompts[2])
        assert after.json()["choices"][0]["text"] == text["m3"][2]  # new requests: new tables
        assert httpx.delete(srv.url + "/v1/memories/m2").status_code == 200
        assert complete(srv.url, "m2", prompts[0]).status_code == 404
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(120)
        assert results and all(status == 200 for _, status, *_ in results), [
            r for r in results if r[1] != 200
        ][:3]
        for model, _, got, when, i in results:
            if model == "base":
                assert got == text["base"][i]
            elif when == "before/before":
                assert got == text["m1"][i]
            elif when == "after/after":
                assert got == text["m3"][i]
            else:  # sent during the reload: either version, whole
                assert got in (text["m1"][i], text["m3"][i])
        assert {w for m, _, _, w, _ in results if m == "m1"} >= {"before/before", "after/after"}
        deadline = time.monotonic() + 30
        while (mems.retired or mems.bytes_held() != held) and time.monotonic() < deadline:
            time.sleep(0.1)  # the old m1 and m2 are freed once idle
        assert not mems.retired and mems.bytes_held() == held


def test_memories_bench_writes_its_table(tiny_ckpt, tmp_path, capsys):
    import json

    from bench.cli import main

    argv = ["--memories", "--model", str(tiny_ckpt), "--rounds", "1", "--num-seqs", "4"]
    argv += ["--prompt-len", "4", "--decode-tokens", "4", "--reload-seconds", "0.6"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "memories.json").read_text())
    assert res["command"].startswith("engram-bench --memories")
    assert list(res["throughput"]) == ["one memory", "1 mixed", "4 mixed", "16 mixed"]
    assert res["throughput"]["16 mixed"]["memories"] == 16
    assert res["reload"]["new_version"] == 2 and res["reload"]["requests_during"] > 0
    assert (tmp_path / "memories.png").stat().st_size > 0
    assert "vs one memory" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mixed_memories_equal_each_alone_and_lru_moves_weights(ours):
    """On the device: memories mixed in steps (eager) and base-only steps (CUDA graphs)
    give each checkpoint's own greedy tokens; --max-memories 1 keeps one memory's weights
    in HBM, the others in host memory."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.memories import MemoryLoader
    from engine.sampling import SamplingParams

    prompts = prompts_for(4, 400)
    place = lambda d, loaded=None: OffloadedModel.load(
        d, "gpu", "resident", "cuda", "float32", progress=False, loaded=loaded
    )
    want = {}
    for n in ("base", "m1", "m2"):
        om = place(ours[n])
        want[n] = generate(om.model, prompts, N_TOKENS, rows=om.prefetcher)
        om.close()
    served = place(ours["base"])
    engine = Engine(served.model, EngineConfig(max_num_seqs=16, max_memories=1), served.prefetcher)
    loader = MemoryLoader(served, place)
    for n in ("m1", "m2"):
        engine.memories.install(loader.load(n, ours[n]))
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = {
        (n, i): engine.add(f"{n}-{i}", p, params, None if n == "base" else n)[0]
        for i, p in enumerate(prompts)
        for n in ("base", "m1", "m2")
    }
    engine.run_until_done()
    for (n, i), s in seqs.items():
        assert s.output_ids == want[n][i], (n, i)
    on_device = [m for m in engine.memories.snapshot() if not m.base and m.on_device]
    assert len(on_device) <= 1 and engine.memories.evictions >= 1
    for m in on_device:
        assert all(p.is_cuda for e in m.engrams.values() for p in e.parameters())
    engine.close()
    served.close()


def test_memories_on_the_file_tier_with_dedup_equal_each_alone(ours):
    """Every memory's tables behind its own DRAM cache over its file (and de-duplicated
    plans): the same tokens as each checkpoint served alone from host memory."""
    size = (ours["base"] / "engram.safetensors").stat().st_size
    out = mixed_equals_alone(
        ours, ["base", "m1", "m2"], vocab=400, placement="file", host_memory_bytes=size, dedup=True
    )
    mem = {m["name"]: m for m in out["offload"]["memories"]}
    assert mem["m1"]["file_tier"] and mem["m1"]["table_bytes"]["file"] > 0


def test_a_base_without_engram_layers_serves_tinyengram_fine_tunes(tmp_path):
    """The TinyEngram use: a plain Qwen3 base, two Engram fine-tunes of it. The base name
    runs the backbone alone, each fine-tune its own layers, all in the same steps."""
    from tests.hf_models import build, save

    save(build("qwen3", 0), tmp_path / "base")
    make_tinyengram(tmp_path / "t1", seed=0)  # the same backbone (seed 0), Engram layers added
    dirs = {
        "base": tmp_path / "base",
        "t1": tmp_path / "t1",
        "t2": make_memory(tmp_path / "t1", tmp_path / "t2", seed=12),
    }
    out = mixed_equals_alone(dirs, ["base", "t1", "t2"], vocab=200)
    assert out["want"]["t1"] != out["want"]["base"]
    mem = {m["name"]: m for m in out["offload"]["memories"]}
    assert mem["t1"]["format"] == "tinyengram" and not mem["t1"]["base"]


def test_an_unloaded_memory_leaves_no_metric_series(ours):
    """Memory names come and go with loads: DELETE takes every per-memory series with it."""
    with serve(ours["base"], served_model_name=["base"], allow_memory_updates=True) as srv:
        r = httpx.post(srv.url + "/v1/memories", json={"name": "m2", "path": str(ours["m2"])})
        assert r.status_code == 200, r.text
        assert complete(srv.url, "m2", prompts_for(1, 400)[0]).status_code == 200
        assert 'memory="m2"' in httpx.get(srv.url + "/metrics").text
        assert httpx.delete(srv.url + "/v1/memories/m2").status_code == 200
        assert 'memory="m2"' not in httpx.get(srv.url + "/metrics").text


def test_an_unload_during_a_load_of_the_name_is_refused(ours):
    """A reload's install after a DELETE would serve the name again: the DELETE is refused
    while the name loads, and the memory stays served."""
    with serve(
        ours["base"],
        served_model_name=["base"],
        memories=[f"m1={ours['m1']}"],
        allow_memory_updates=True,
    ) as srv:
        srv.state.memory_loading.claim("m1")  # a reload of m1 under way
        r = httpx.delete(srv.url + "/v1/memories/m1")
        assert r.status_code == 400 and "being loaded" in r.json()["error"]["message"], r.text
        srv.state.memory_loading.drop("m1")
        assert _memories(srv.url) == {"base": 1, "m1": 1}
        assert httpx.delete(srv.url + "/v1/memories/m1").status_code == 200
        assert _memories(srv.url) == {"base": 1}


def test_a_memory_update_after_the_engine_stopped_is_answered(ours):
    """A load or unload posted once the engine thread is gone fails at once (a 503 over
    HTTP), never waits forever holding its name."""
    from engine.async_engine import EngineDead

    with serve(ours["base"], served_model_name=["base"], memories=[f"m1={ours['m1']}"]) as srv:
        engine = srv.state.engine
    with pytest.raises(EngineDead):
        engine.remove_memory("m1").result(timeout=5)
