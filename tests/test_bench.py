import json

import pytest
import torch

from bench import cli as bench
from bench.checks import TokenCheck
from bench.rounds import timed_rounds
from bench.stats import fmt_penalty, penalty, summarize
from bench.summary import failures
from bench.synthetic import (
    ENGRAM_LAYER,
    SHAPES,
    Shape,
    build_synthetic_model,
    engram_param_count,
    random_store,
    synthetic_config,
)
from bench.workload import Job, rotation
from engine import determinism
from models.checkpoint import save_checkpoint
from offload import paths
from offload.link import measure_copy_bandwidth, measure_link
from offload.offloaded_model import OffloadedModel
from offload.prefetch import WorkerGather
from offload.store import Placement, cupy_ok

from .conftest import tiny_model

# small enough for a few seconds on a busy CPU
SMALL = [
    "--quick",
    "--num-seqs", "2",
    "--prompt-len", "20,60",
    "--decode-tokens", "4",
    "--batch-sizes", "1,3",
    "--sweep-steps", "3",
    "--micro-rows", "256,1024",
    "--repeats", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tiny_model(3), tmp_path_factory.mktemp("ckpt"))


def expected_rows(device: torch.device) -> list[str]:
    """What a default run compares on this machine (the placement default follows the device)."""
    if device.type == "cpu":
        return ["cpu/resident", "cpu/worker", "cpu/worker+dedup"]
    if not cupy_ok():
        return ["gpu/resident"]
    host = [f"host/{g}{d}" for g in paths.valid_gathers(Placement.HOST) for d in ("", "+dedup")]
    return ["gpu/resident", *host]


def is_summary(s: dict, repeats: int) -> bool:
    return (
        len(s["raw"]) == repeats
        and s["min"] <= s["median"] <= s["max"]
        and (s["spread_pct"] is None) == (repeats < 2)
    )


def test_quick_run_writes_rows_penalties_checks_and_plots(ckpt, tmp_path, capsys):
    before = determinism.current()
    out = tmp_path / "out"
    assert bench.main([*SMALL, "--model", str(ckpt), "--out", str(out)]) == 0
    assert determinism.current() == before  # the bench's deterministic mode is undone
    res = json.loads((out / "bench.json").read_text())
    device = paths.resolve_device(None)
    cuda = device.type == "cuda"
    assert [r["name"] for r in res["rows"]] == expected_rows(device)
    assert res["tokens_identical"] and res["rows_identical"] and res["failures"] == []
    assert (
        res["deterministic"]["enabled"] and res["deterministic"]["settings"]["matmul_tf32"] is False
    )
    for r in res["rows"]:
        p = r["paper"]
        for k in ("prefill_tok_s", "decode_tok_s", "total_tok_s", "prefill_s", "decode_s"):
            assert is_summary(p[k], 2), k
        for k in ("prefill", "decode", "total"):
            assert isinstance(p["penalty"][k]["pct"], float)
            assert p["penalty"][k]["verdict"] in ("within noise", "slower", "faster")
        for phase in ("prefill_hw", "decode_hw"):
            roof = p[phase]["roofline"]
            assert roof["bytes_per_step"] > roof["weight_bytes_per_step"] > 0
            assert 0 < roof["fraction_of_peak"]
            busy = p[phase]["gpu_busy"]
            assert busy is None if not cuda else 0 < busy["fraction"] < 2
        assert [s["batch_size"] for s in r["sweep"]] == [1, 3]
        assert all(
            is_summary(s["tok_s"], 2) and s["penalty"]["pct"] is not None for s in r["sweep"]
        )
        assert set(p["all"]["layers"]) == {"0", "2"} and p["all"]["bytes_per_step"] > 0
        assert r["memory"]["table_bytes_by_tier"][r["placement"]] > 0
        rows, tokens = r["checks"]["rows"], r["checks"]["tokens"]
        assert rows["ok"] and rows["rows"] > 0 and rows["steps"] == 3 * 3  # 3 jobs x 3 steps
        assert tokens["all_identical"] and tokens["runs"] == 3 * (1 + 2)  # warm-up + 2 rounds
        if r is not res["rows"][0]:
            assert r["checks"]["logits"]["steps"] == 9
            assert r["checks"]["logits"]["max_abs_diff"] == 0.0  # deterministic, same rows
    assert res["rows"][0]["paper"]["penalty"]["total"]["pct"] == 0.0
    label = "pinned host-to-device" if cuda else "memcpy"
    assert res["ceiling"]["gbps"] > 0 and label in res["ceiling"]["label"]
    assert res["memory_bandwidth"]["gbps"] > 0
    if not cuda:  # the CPU microbenchmark: resident vs worker, row widths and formats
        micro = res["micro"]
        assert [m["rows"] for m in micro["rows"]] == [256, 1024] * 6  # 3 widths x bf16, fp8
        assert {(m["format"], m["row_bytes"]) for m in micro["rows"]} == {
            ("bf16", 128),
            ("bf16", 256),
            ("bf16", 512),
            ("fp8", 66),
            ("fp8", 132),
            ("fp8", 264),
        }
        assert all(m["resident_gbps"] > 0 and m["worker_gbps"] > 0 for m in micro["rows"])
        host = micro["host_gather"]
        assert [h["row_bytes"] for h in host] == [128, 256, 512]
        assert all(
            r["memcpy_gbps"] > 0 and r["best_fraction_of_memcpy"] > 0 for r in host[0]["rows"]
        )
        assert [r["rows"] for r in micro["huge_pages"]["rows"]] == [256, 1024]
        # no link on a CPU: no share of one, and the memcpy line is a reference, not a ceiling
        assert res["ceiling"]["link"] is False
        assert all(m["worker_fraction_of_ceiling"] is None for m in micro["rows"])
        assert all(r["paper"]["all"]["fraction_of_ceiling"] is None for r in res["rows"])
    else:
        assert res["ceiling"]["link"] is True
    placement = paths.default_placement(device).value
    assert res["model"]["table_memory"]["placement"] == placement
    assert res["model"]["table_memory"]["row_formats"] == ["bf16"]
    assert res["command"].startswith("engram-bench --quick")
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["commit"] and "dirty" in env
    assert set(res["bench_seconds"]) >= {"warm_up_s", "timed_s", "micro_s", "total_s"}
    for name in ("penalty_vs_batch.png", "stall_per_layer.png", "gbps_vs_rows.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert expected_rows(device)[-1] in printed and "penalty" in printed
    if not cuda:
        assert "link ceiling: none (no link on CPU)" in printed
        micro_table = printed.split("gather microbenchmark", 1)[1].split("\n\n", 1)[0]
        assert "%" not in micro_table.split("\n", 2)[2]  # GB/s alone, no share of a link
    assert "peak memory bandwidth" in printed and "Engram rows" in printed


class OneBadRow(WorkerGather):
    """The real worker gather, then the first row it fetched changed in one value."""

    def gather_layer(self, lp):
        out = super().gather_layer(lp)
        out[0, 0] += 1.0
        return out


@pytest.mark.parametrize("deterministic", ["--deterministic", "--no-deterministic"])
def test_a_path_handing_over_a_wrong_row_fails_the_run(
    ckpt, tmp_path, monkeypatch, capsys, deterministic
):
    monkeypatch.setitem(paths.PREFETCHERS, "worker", OneBadRow)
    out = tmp_path / "out"
    args = [*SMALL, "--model", str(ckpt), "--out", str(out), "--dedup", "off", "--no-plots"]
    assert bench.main([*args, "--device", "cpu", "--repeats", "1", deterministic]) == 1
    err = capsys.readouterr().err
    assert "row 'cpu/worker' handed the model Engram rows that differ" in err
    res = json.loads((out / "bench.json").read_text())
    base, bad = (r["checks"]["rows"] for r in res["rows"])
    assert base["ok"] and base["mismatched"] == 0
    assert not bad["ok"] and not res["rows_identical"]
    assert set(bad["mismatched_by_layer"]) == {"0", "2"}  # one row per layer per checked step
    assert bad["mismatched"] == 2 * bad["steps"]
    if deterministic == "--no-deterministic":  # tokens are reported, never a failure
        assert "different greedy tokens" not in err
        assert 0 <= res["rows"][1]["checks"]["tokens"]["identical_share"] <= 1


def test_noise_rule():
    base = summarize([100.0, 104.0, 96.0])
    assert base["median"] == 100.0 and base["spread_pct"] == pytest.approx(4.0)
    assert base["raw"] == [100.0, 104.0, 96.0]
    inside = penalty(summarize([97.0, 98.0, 97.5]), base)
    assert inside["verdict"] == "within noise" and inside["pct"] == pytest.approx(2.5)
    assert fmt_penalty(inside) == "within noise (+-4.0%)"
    slower = penalty(summarize([90.0, 91.0, 89.0]), base)
    assert slower["verdict"] == "slower" and fmt_penalty(slower) == "+10.0%"
    faster = penalty(summarize([110.0, 110.0]), base)
    assert faster["verdict"] == "faster" and fmt_penalty(faster) == "-10.0%"
    once = penalty(summarize([90.0]), summarize([100.0]))
    assert once["verdict"] == "no noise estimate" and fmt_penalty(once) == "+10.0%*"
    assert fmt_penalty(penalty(None, base)) == "-"
    # the rule is about the baseline's spread, not the path's
    noisy_path = penalty(summarize([80.0, 95.0, 110.0]), base)
    assert noisy_path["verdict"] == "slower"


def test_rotation_puts_every_path_in_every_position():
    orders = [rotation(3, r) for r in range(3)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == [0, 1, 2]
    assert rotation(3, 4) == rotation(3, 1) and rotation(1, 5) == [0]


class Recorder:
    """Stands in for a path: records the order it is run in."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls, self.tokens = name, calls, TokenCheck()

    def run(self, job, mode):
        self.calls.append((job.name, self.name, mode))
        return [[1, 2]]


def test_timed_rounds_interleave_paths_in_rotated_order():
    calls: list = []
    benches = [Recorder(n, calls) for n in ("a", "b", "c")]
    jobs = [Job("paper", [[5]], 0, 1, True), Job("sweep1", [[5]], 1, 1, False)]
    ref = {"paper": [[1, 2]], "sweep1": [[1, 3]]}
    timed_rounds(benches, jobs, 3, ref, lambda what: None)
    assert [c[1] for c in calls[:9]] == list("abcbcacab")
    assert [c[0] for c in calls] == ["paper"] * 9 + ["sweep1"] * 9
    assert all(c[2] == "timed" for c in calls)
    assert benches[0].tokens.runs == 6 and not benches[0].tokens.all_identical


def test_token_check_counts_the_common_prefix_and_failures_follow_the_mode():
    tc = TokenCheck()
    tc.add("paper round 1", [[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    assert (tc.tokens, tc.identical) == (5, 4) and not tc.all_identical
    assert tc.first_difference == "paper round 1, sequence 0, generated token 2"
    ok = {"ok": True, "rows": 10, "mismatched": 0, "first": None}
    rows = [
        {"name": "cpu/resident", "checks": {"rows": ok, "tokens": TokenCheck().as_dict()}},
        {"name": "cpu/worker", "checks": {"rows": ok, "tokens": tc.as_dict()}},
    ]
    assert failures(rows, deterministic=False) == []
    (msg,) = failures(rows, deterministic=True)
    assert "row 'cpu/worker' produced different greedy tokens" in msg and "token 2" in msg


def test_job_kv_reads_match_a_step_by_step_count():
    job = Job("sweep2", [[0] * 5, [0] * 9], 2, 3, False)
    # decode step j attends to L + j tokens; timed steps are j = 3, 4, 5
    assert job.kv_tokens_read("decode") == sum(L + j for L in (5, 9) for j in (3, 4, 5))
    assert job.phase_tokens("decode") == 6 and job.phase_tokens("prefill") == 14
    assert job.kv_blocks == 1 + 1  # 5 + 5 + 1 and 9 + 5 + 1 tokens: one block each


def test_roofline_counts_weights_once_and_busy_merges_overlaps():
    from bench.roofline import kv_bytes_per_token, union_seconds, weight_bytes

    model = tiny_model(0)
    c = model.config
    params = sum(p.numel() * 4 for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel() * 4
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_bytes(model) == params - (0 if tied else embed)
    assert (
        kv_bytes_per_token(model)
        == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    )
    assert union_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    assert union_seconds([]) == 0.0


def test_device_intervals_read_a_real_profiler_session():
    """The profiler fields GPU busy reads exist in this torch; CPU work is not device time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.roofline import device_intervals

    prof = profile(activities=[ProfilerActivity.CPU])
    prof.start()
    torch.randn(64, 64) @ torch.randn(64, 64)
    prof.stop()
    assert prof.profiler.kineto_results.events()  # the CPU ops were recorded ...
    assert device_intervals(prof) == []  # ... and none of them is device time


@pytest.mark.parametrize(
    "args, message",
    [
        (["--placement", "host"], "needs a CUDA device"),
        (["--placement", "gpu"], "needs a CUDA device"),
        (["--device", "cpu", "--gathers", "uva"], "does not work with placement 'cpu'"),
        (["--layers", "4"], "only applies to --synthetic"),
    ],
)
def test_bad_input_is_one_line_error(ckpt, tmp_path, capsys, args, message):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has CUDA")
    assert bench.main([*args, "--quick", "--model", str(ckpt), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engram-bench: error: ") and message in err and "\n" not in err


def test_missing_default_model_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "default_model_dir", lambda: tmp_path / "nothing")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "--model DIR or --synthetic" in capsys.readouterr().err


def test_synthetic_builder_tiny_model_and_store():
    cfg = synthetic_config(
        "dense-8b-like",
        engram_params=4e4,
        layers=3,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        engram_head_dim=8,
        engram_n_heads=2,
    )
    assert cfg.num_hidden_layers == 3 and cfg.engram_layer_ids == [ENGRAM_LAYER] == [1]
    model = build_synthetic_model(cfg, "cpu", torch.float32, seed=1)
    assert len(model.model.layers) == 3
    assert [i for i, lay in enumerate(model.model.layers) if lay.engram is not None] == [1]
    assert model.engram_table(1).is_meta  # tables live only in the store
    assert abs(engram_param_count(model) - 4e4) / 4e4 < 0.05  # primes round up
    store = random_store(model, "cpu", "cpu", torch.bfloat16, seed=1, progress=False)
    again = random_store(model, Placement.CPU, "cpu", torch.bfloat16, seed=1, progress=False)
    assert store.placement is Placement.CPU and list(store.tables) == [1]
    assert store[1].tensor.dtype == torch.bfloat16
    assert store[1].rows == model.hasher.table_rows(1)
    assert torch.equal(store[1].tensor, again[1].tensor)
    assert torch.isfinite(store[1].tensor.float()).all()
    # the model runs from that store
    engine = OffloadedModel.from_parts(model, None, store, "worker", "cpu")
    from engine.generate import generate

    out = generate(model, [[1, 2, 3], [4, 5]], 3, rows=engine.prefetcher)
    engine.close()
    assert [len(x) for x in out] == [3, 3]


def test_cli_runs_a_synthetic_model(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny-test", Shape(64, 96, 4, 4, 2, 500, True, 1e4))
    out = tmp_path / "out"
    args = [*SMALL, "--synthetic", "tiny-test", "--engram-params", "3e5", "--layers", "2"]
    args += ["--device", "cpu", "--repeats", "1"]
    assert bench.main([*args, "--out", str(out), "--no-plots", "--dedup", "off"]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert res["model"]["synthetic"] == "tiny-test"
    assert res["model"]["config"]["num_hidden_layers"] == 2
    assert res["model"]["config"]["engram_layer_ids"] == [1]
    # heads take successive distinct primes: a few % over at this tiny size
    assert 3e5 <= res["model"]["engram_table_params"] < 1.2 * 3e5
    assert res["tokens_identical"] and len(res["rows"]) == 2
    assert set(res["rows"][1]["paper"]["all"]["layers"]) == {"1"}


def test_link_ceiling_is_one_measurement_for_bench_and_server():
    ceiling = measure_link("cpu", 1 << 20, repeats=2)
    assert ceiling.bytes == 1 << 20 and ceiling.seconds > 0 and "memcpy" in ceiling.label
    assert ceiling.gbps == ceiling.bytes_per_s / 1e9 > 0
    assert measure_copy_bandwidth("cpu", 1 << 20, repeats=2) > 0  # the server's figure


def test_synthetic_rejects_bad_shapes():
    with pytest.raises(ValueError, match="no layer 1"):
        synthetic_config("dense-4b-like", 1e6, layers=1)
    with pytest.raises(ValueError, match="unknown synthetic model"):
        synthetic_config("moe-1t", 1e6)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")
def test_cuda_host_paths_match_gpu_resident(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny-test", Shape(64, 96, 4, 4, 2, 500, True, 1e4))
    out = tmp_path / "out"
    args = [*SMALL, "--synthetic", "tiny-test", "--engram-params", "3e5", "--layers", "3"]
    assert bench.main([*args, "--device", "cuda", "--placement", "host", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "gpu/resident" and "host/staged" in names and "host/uva+dedup" in names
    assert res["tokens_identical"] and res["rows_identical"]
    assert res["deterministic"]["cublas_workspace_config"] in (":4096:8", ":16:8")
    assert "pinned host-to-device" in res["ceiling"]["label"]
    assert "device-to-device" in res["memory_bandwidth"]["label"]
    assert {"staged_s", "uva_s", "resident_s", "index_select_s"} <= set(res["micro"]["rows"][0])
    assert {"bf16 128 B", "fp8 66 B"} <= set(res["micro"]["crossover_rows"])
    assert res["model"]["table_memory"]["registered"]
    assert res["environment"]["cuda_driver"] and res["environment"]["cupy"]
    for r in res["rows"]:
        assert r["checks"]["rows"]["ok"] and r["checks"]["rows"]["rows"] > 0
        if r["name"] != "gpu/resident":
            assert r["checks"]["logits"]["max_abs_diff"] == 0.0  # deterministic, same rows
        for hw in (r["paper"]["decode_hw"], *r["sweep"]):
            assert 0 < hw["gpu_busy"]["fraction"] < 2  # kernel time over wall time
            assert 0 < hw["roofline"]["fraction_of_peak"] < 2
        assert r["memory"]["gpu_max_allocated_bytes"] > 0
    host = [r for r in res["rows"] if r["placement"] == "host"]
    assert all(r["memory"]["table_bytes_by_tier"]["gpu"] == 0 for r in host)
    assert all(r["memory"]["table_bytes_by_tier"]["host"] > 0 for r in host)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")
def test_cuda_path_handing_over_a_wrong_row_fails(tmp_path, monkeypatch):
    from offload.cuda_gather import UvaGather

    class UvaOneBadRow(UvaGather):
        """The real UVA gather, then the first row it fetched changed in one value."""

        def gather_layer(self, lp, *args, **kwargs):
            out = super().gather_layer(lp, *args, **kwargs)
            out[0, 0] += 1.0
            return out

    monkeypatch.setitem(paths.PREFETCHERS, "uva", UvaOneBadRow)
    monkeypatch.setitem(SHAPES, "tiny-test", Shape(64, 96, 4, 4, 2, 500, True, 1e4))
    args = [*SMALL, "--synthetic", "tiny-test", "--engram-params", "3e5", "--layers", "3"]
    args += ["--device", "cuda", "--placement", "host", "--gathers", "uva,staged"]
    out = tmp_path / "out"
    assert bench.main([*args, "--dedup", "off", "--no-plots", "--out", str(out)]) == 1
    res = json.loads((out / "bench.json").read_text())
    by_name = {r["name"]: r["checks"]["rows"] for r in res["rows"]}
    assert not by_name["host/uva"]["ok"] and by_name["host/staged"]["ok"]
    assert by_name["gpu/resident"]["ok"]
