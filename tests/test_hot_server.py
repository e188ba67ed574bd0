"""The real server with a hot-row cache: greedy completions equal the server's without one
(static set from engram-profile beside the checkpoint, and adaptive), hits counted in
/metrics under tier="hot", the cache described per layer in /v1/offload."""

import shutil

import httpx
import pytest

from offload.profile import HOT_ROWS_FILE
from offload.profile import main as profile_main
from server.config import ServerConfig

from .live import LiveServer, serve

PROMPTS = ["def main(argv):", "import os\nimport sys\n", "class Foo:\n    def"]


def _greedy(srv) -> list[str]:
    out = []
    for p in PROMPTS:
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"prompt": p, "max_tokens": 12, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


@pytest.fixture(scope="module")
def profiled(tiny_ckpt, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("hot") / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    assert profile_main(["--model", str(ckpt), "--max-files", "2", "--top", "0.05"]) == 0
    assert (ckpt / HOT_ROWS_FILE).is_file()
    return ckpt


def test_server_tokens_identical_with_hot_rows(profiled):
    with serve(profiled, max_num_seqs=4) as srv:
        ref = _greedy(srv)
    for policy in ("static", "adaptive"):
        with serve(
            profiled, max_num_seqs=4, hot_rows="0.05", hot_rows_policy=policy, hot_rows_refresh=2
        ) as srv:
            assert _greedy(srv) == ref, policy
            hits = srv.metric("engram_offload_cache_hits_total", 'tier="hot"')
            queries = srv.metric("engram_offload_cache_queries_total", 'tier="hot"')
            assert 0 < hits <= queries, policy
            info = httpx.get(srv.url + "/v1/offload").json()["hot_cache"]
            assert info and all(0 < v["hit_rate"] <= 1 for v in info.values()), info
            assert all(v["policy"] == policy and v["bytes"] > 0 for v in info.values())
            if policy == "adaptive":
                assert all(v["refreshes"] > 0 for v in info.values())


def test_static_hot_rows_without_a_profile_is_refused(tiny_ckpt):
    srv = LiveServer(ServerConfig.make(model=str(tiny_ckpt), hot_rows="16"))
    try:
        with pytest.raises(RuntimeError, match="--hot-rows-file"):
            srv.start()
    finally:
        srv.stop()


def test_server_tokens_identical_with_hot_rows_over_the_file_tier(profiled):
    """file + DRAM cache + hot cache through the real server (tables 4x --host-memory-bytes):
    greedy completions equal host-resident serving's, both hot policies; hot hits and DRAM
    cache misses both counted."""
    from models.checkpoint import ENGRAM_FILE, table_key
    from models.config import ModelConfig
    from offload.file_tier import table_bytes

    lids = ModelConfig.load(profiled).engram_layer_ids
    total = sum(table_bytes(profiled / ENGRAM_FILE, {i: table_key(i) for i in lids}).values())
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 8}
    with serve(profiled, **kw) as srv:
        ref = _greedy(srv)
    for policy in ("static", "adaptive"):
        with serve(
            profiled,
            host_memory_bytes=total // 4,
            hot_rows="0.05",
            hot_rows_policy=policy,
            hot_rows_refresh=2,
            **kw,
        ) as srv:
            assert _greedy(srv) == ref, policy
            assert srv.metric("engram_offload_cache_hits_total", 'tier="hot"') > 0, policy
            info = httpx.get(srv.url + "/v1/offload").json()
            assert info["file_tier"] and info["hot_cache"], info
            for lid in lids:
                layer = info["accounting"]["layers"][str(lid)]
                assert layer["tier"] == "file" and layer["file_misses"] > 0, layer
                assert layer["hot_hit_rate"] > 0, layer
