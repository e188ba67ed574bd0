import json

import pytest
import torch

from bench import cli as bench
from bench.synthetic import (
    ENGRAM_LAYER,
    SHAPES,
    Shape,
    build_synthetic_model,
    engram_param_count,
    random_store,
    synthetic_config,
)
from models.checkpoint import save_checkpoint
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
    "--runs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tiny_model(3), tmp_path_factory.mktemp("ckpt"))


def test_quick_run_writes_rows_penalties_and_plots(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench.main([*SMALL, "--model", str(ckpt), "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["cpu/resident", "cpu/worker", "cpu/worker+dedup"]
    assert res["tokens_identical"] and all(r["tokens_match"] for r in res["rows"])
    for r in res["rows"]:
        pen = r["paper"]["penalty_pct"]
        assert all(isinstance(pen[k], float) for k in ("prefill", "decode", "total"))
        assert [s["batch_size"] for s in r["sweep"]] == [1, 3]
        assert all(isinstance(s["penalty_pct"], float) for s in r["sweep"])
        assert set(r["paper"]["all"]["layers"]) == {"0", "2"}
        assert r["paper"]["all"]["bytes_per_step"] > 0
        assert r["memory"]["table_bytes_by_tier"]["cpu"] > 0
    assert res["rows"][0]["paper"]["penalty_pct"]["total"] == 0.0
    assert res["ceiling"]["gbps"] > 0 and "memcpy" in res["ceiling"]["label"]
    assert [m["rows"] for m in res["micro"]["rows"]] == [256, 1024]
    assert res["command"].startswith("engram-bench --quick")
    assert res["environment"]["torch"] == torch.__version__
    for name in ("penalty_vs_batch.png", "stall_per_layer.png", "gbps_vs_rows.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "cpu/worker+dedup" in printed and "penalty" in printed


def test_a_row_with_different_tokens_fails_naming_it(ckpt, tmp_path, monkeypatch, capsys):
    def perturbed(self, lp):
        return -3.0 * self.gather_host(lp) + 1.0

    monkeypatch.setattr(WorkerGather, "gather_layer", perturbed)
    out = tmp_path / "out"
    args = [*SMALL, "--model", str(ckpt), "--out", str(out), "--dedup", "off", "--no-plots"]
    assert bench.main(args) == 1
    err = capsys.readouterr().err
    assert "row 'cpu/worker' produced different tokens" in err
    res = json.loads((out / "bench.json").read_text())
    assert not res["tokens_identical"]
    assert [r["tokens_match"] for r in res["rows"]] == [True, False]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--placement", "host"], "needs a CUDA device"),
        (["--placement", "gpu"], "needs a CUDA device"),
        (["--gathers", "uva"], "does not work with placement 'cpu'"),
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
    assert res["tokens_identical"]
    assert "pinned host-to-device" in res["ceiling"]["label"]
    assert {"staged_s", "uva_s", "resident_s"} <= set(res["micro"]["rows"][0])
    host = [r for r in res["rows"] if r["placement"] == "host"]
    assert all(r["memory"]["table_bytes_by_tier"]["gpu"] == 0 for r in host)
    assert all(r["memory"]["table_bytes_by_tier"]["host"] > 0 for r in host)
