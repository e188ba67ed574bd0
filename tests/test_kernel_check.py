"""The start-up kernel check (engine/kernel_check.py): every kernel the server will use against
its reference. On CPU the Triton attention kernels run in the interpreter; a deliberately wrong
kernel stops the real start-up with one line naming it, the error and the flag that avoids it."""

import logging

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kernel_check import KernelCheckError, Kernels, check_gather, check_kernels
from engine.paged_attention import paged_attention_decode, paged_attention_prefill
from offload.offloaded_model import OffloadedModel
from offload.prefetch import WorkerGather

from .conftest import tiny_model

pytest.importorskip("triton")


def wrong_decode(q, k, v, tables, ctx, block_size, scale, **kw):
    """The real decode kernel with the softmax scale doubled: plausible output, wrong."""
    return paged_attention_decode(q, k, v, tables, ctx, block_size, 2 * scale, **kw)


def wrong_prefill(q, k, v, tables, qsl, ctx, max_q, block_size, scale, **kw):
    return paged_attention_prefill(q, k, v, tables, qsl, ctx, max_q, block_size, 2 * scale, **kw)


def _engine(attention="triton") -> Engine:
    om = OffloadedModel.from_model(tiny_model(), "cpu", "worker")
    cfg = EngineConfig(max_num_seqs=4, kv_blocks=32, attention=attention)
    return Engine(om.model, cfg, rows=om.prefetcher)


def test_every_kernel_in_use_agrees_with_its_reference():
    checked = check_kernels(_engine())
    names = [c.kernel for c in checked]
    assert names[:2] == ["attention decode", "attention prefill"]
    assert names[2].startswith("Engram row gather (worker")
    assert all(c.ok for c in checked)
    assert checked[2].error == 0.0  # rows: bit for bit
    # the reference attention path has no kernel of ours to check, the gather still
    assert [c.kernel[:17] for c in check_kernels(_engine("reference"))] == ["Engram row gather"]


@pytest.mark.parametrize(
    "kernels,name",
    [(Kernels(decode=wrong_decode), "decode"), (Kernels(prefill=wrong_prefill), "prefill")],
)
def test_a_wrong_attention_kernel_is_named_with_its_error_and_the_flag(kernels, name):
    with pytest.raises(KernelCheckError) as err:
        check_kernels(_engine(), kernels)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"attention {name}: max abs error" in msg and "--attention reference" in msg


class FlippedRows(WorkerGather):
    """The worker path with one bit of every row flipped: a wrong gather."""

    def gather_layer(self, lp):
        rows = super().gather_layer(lp)
        return (rows.view(torch.int32) ^ 1).view(rows.dtype)


def test_a_wrong_gather_fails_bit_for_bit_and_names_the_flag():
    store = OffloadedModel.from_model(tiny_model(), "cpu", "worker").store
    (c,) = check_gather(FlippedRows(store), torch.device("cpu"))
    assert not c.ok and c.error == 1.0 and c.flag == "--gather resident"
    with pytest.raises(KernelCheckError, match=r"gather \(worker, f32 rows\).*--gather resident"):
        raise KernelCheckError(c)


def test_a_wrong_kernel_stops_the_real_start_up_with_one_line(tiny_ckpt, caplog):
    pytest.importorskip("fastapi")
    from server.app import ServerState
    from server.config import ServerConfig

    cfg = ServerConfig.make(model=str(tiny_ckpt), attention="triton", max_num_seqs=2)
    state = ServerState(cfg, kernels=Kernels(decode=wrong_decode))
    failed = []
    state.on_load_error = lambda: failed.append(True)
    caplog.set_level(logging.INFO, logger="engram.server")
    state.load()  # the loader thread's body: every phase of the start-up, for real
    assert state.engine is None and failed == [True]
    line = state.load_error
    assert line.startswith("start-up kernel check failed: attention decode: max abs error")
    assert line.endswith("start with --attention reference to avoid it") and "\n" not in line
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [line] and errors[0].exc_info is None
    # and with the serving kernels the same start-up passes the check and says so
    ok = ServerState(cfg)
    ok.load()
    try:
        assert ok.engine is not None and ok.load_error is None
        assert any(
            "kernel check passed: attention decode" in r.getMessage() for r in caplog.records
        )
        assert "kernel check" in ok.startup.line()
    finally:
        ok.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("row_format", ["auto", "fp8"])
def test_gpu_start_up_check_covers_attention_gathers_and_graphs(row_format):
    om = OffloadedModel.load(device="cuda", progress=False, row_format=row_format)
    try:
        engine = Engine(om.model, EngineConfig(max_num_seqs=8), rows=om.prefetcher)
        checked = check_kernels(engine)
        names = " | ".join(c.kernel for c in checked)
        assert "attention decode" in names and "attention prefill" in names
        assert "decode CUDA graph replay vs eager (batch 1" in names
        assert "decode CUDA graph replay vs eager (batch 8" in names
        if om.placement.value == "host":  # 'auto' serves rows by both CUDA paths
            assert "gather (uva" in names and "gather (staged" in names
        if row_format == "fp8":
            assert "fp8 rows" in names
        assert all(c.ok for c in checked), [c.line() for c in checked]
    finally:
        om.close()
