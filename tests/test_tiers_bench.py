"""engram-bench --tiers end to end on the built-in model (a tiny workload): every tier
combination serves the resident path's tokens, each cache's hits and each link's bytes land
in its own row, the README table comes from the JSON."""

import json

from bench.cli import main
from bench.tiers import markdown

ROWS = [
    "resident",
    "host",
    "host + hot static",
    "host + hot adaptive",
    "file + DRAM, sync reads",
    "file + DRAM",
    "file + DRAM, pread",
    "file + DRAM, io_uring unannounced",
    "file + DRAM, io_uring submitted by the plan",
    "file + DRAM, announced by the first gather",
    "file + DRAM, reads on threads",
    "file + DRAM, cold start",
    "file + DRAM, cold, hash directory, CLOCK bits",
    "file + DRAM + hot static",
    "file + DRAM + hot adaptive",
]


def test_tiers_bench_writes_every_combination(tmp_path):
    argv = ["--tiers", "--rounds", "1", "--num-seqs", "2", "--decode-tokens", "4"]
    assert main([*argv, "--profile-files", "3", "--refresh", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "tiers.json").read_text())
    assert (tmp_path / "tiers.png").stat().st_size > 0
    assert res["setup"]["table_over_budget"] >= 3.9  # the default budget: a quarter
    for prompts in ("text", "random"):
        rows = res["rows"][prompts]
        assert list(rows) == ROWS
        assert all(v["tokens_equal_resident"] for v in rows.values())
        for name, v in rows.items():
            b = v["bytes_per_token"]
            assert (b["file_to_dram"] > 0) == name.startswith("file"), name
            assert (v["dram_hit_rate"] is not None) == name.startswith("file"), name
            assert ("verdict_vs_host_10pct" in v) == name.startswith("file")
            assert b["host_to_compute"] > 0
    text = res["rows"]["text"]
    assert text["host + hot static"]["hot_hit_rate"]["median"] > 0
    assert text["file + DRAM + hot static"]["hot_hit_rate"]["median"] > 0
    assert text["resident"]["hot_hit_rate"]["median"] == 0
    table = markdown(res)
    assert table.count("| file + DRAM") == 22 and "NO |" not in table
    # warmed from the profile, the DRAM cache starts with the frequent rows the cold one lacks
    warm, cold = text["file + DRAM"], text["file + DRAM, cold start"]
    assert warm["dram_hit_rate"]["median"] > cold["dram_hit_rate"]["median"]
    assert warm["file_plan_ms_per_step"]["median"] > 0
    sync, issued = text["file + DRAM, sync reads"], text["file + DRAM"]
    assert sync["file_wait_ms_per_step"]["median"] == 0  # read in the plan: nothing to wait for
    assert issued["file_read_ms_per_step"]["median"] > 0


def test_row_selects_rows_beside_the_baselines_and_refuses_unknown_names(tmp_path, capsys):
    import pytest

    from bench.tiers import ROW_NAMES

    assert list(ROW_NAMES) == ROWS
    argv = ["--tiers", "--rounds", "1", "--num-seqs", "2", "--decode-tokens", "4"]
    argv += ["--profile-files", "3", "--row", "file + DRAM", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "tiers.json").read_text())
    assert all(list(rows) == ["resident", "host", "file + DRAM"] for rows in res["rows"].values())
    with pytest.raises(SystemExit):
        main(["--tiers", "--row", "file + nothing"])
    assert "unknown --row ['file + nothing']" in capsys.readouterr().err
