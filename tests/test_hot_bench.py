"""engram-bench --hot-cache end to end on the built-in model (a tiny workload): every row
serves the resident path's tokens, the hot rows hit, refresh cost recorded."""

import json

from bench.cli import main


def test_hot_cache_bench_writes_its_table(tmp_path, capsys):
    argv = ["--hot-cache", "--rounds", "1", "--num-seqs", "2", "--decode-tokens", "4"]
    assert main([*argv, "--profile-files", "3", "--refresh", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "hotcache.json").read_text())
    assert res["command"].startswith("engram-bench --hot-cache")
    for prompts in ("text", "random"):
        rows = res["rows"][prompts]
        assert set(rows) == {"resident", "host", "host + hot static", "host + hot adaptive"}
        assert all(v["tokens_equal_resident"] for v in rows.values())
        assert rows["resident"]["hit_rate"]["median"] == 0
    assert res["rows"]["text"]["host + hot static"]["hit_rate"]["median"] > 0
    for v in res["adaptive_refresh"].values():
        assert v["refreshes"] > 0 and v["replaced_per_refresh"] <= v["max_replace"]
    assert "hit rate" in capsys.readouterr().out


def test_refresh_cost_bench_writes_its_json(tmp_path):
    from bench.refresh_cost import main as refresh_main

    argv = ["--held", "2000", "20000", "--window", "512", "--replace", "32", "--refreshes", "4"]
    assert refresh_main([*argv, "--label", "t", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "refresh-t.json").read_text())
    assert [r["held_rows"] for r in res["rows"]] == [2000, 20000]
    assert all(r["replaced"] > 0 and r["compaction_us"] > 0 for r in res["rows"])
