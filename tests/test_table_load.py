"""Loading Engram tables: our header parser, streamed reads into the tier, DeepSeek-V4.1's fp8
layout, refusal of truncated or corrupt files, and the load's peak RSS."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.safetensors_header import TableFileError, read_header
from offload.quantize import quantize_table_file, read_row_formats
from offload.rowformat import RowFormat, dequantize_fp8, quantize_fp8
from offload.store import TableStore

ROOT = Path(__file__).resolve().parents[1]
V41 = "model.layers.3.engram.embed"


def old_rows(path, key, split=False):
    """What the safetensors library itself reads for a table (the old load path)."""
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(key)
        if split:
            return torch.cat([t.view(torch.uint8), f.get_tensor(f"{key}.scales")], dim=1)
        return t


def write_table(path, rows=1000, width=64, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    t = (torch.randn(rows, width) * 3).to(dtype)
    save_file({"other": torch.arange(7), "t": t}, str(path))
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_rows", [37, 1 << 16])
def test_plain_rows_are_bit_identical_to_safetensors(tmp_path, dtype, chunk_rows):
    path = tmp_path / "t.safetensors"
    write_table(path, dtype=dtype)
    store = TableStore.from_safetensors(path, {0: "t"}, "cpu", chunk_rows=chunk_rows)
    got = store[0].tensor
    assert got.dtype == dtype and torch.equal(
        got.view(torch.uint8), old_rows(path, "t").view(torch.uint8)
    )
    assert store.load_stats.bytes == got.numel() * got.element_size()
    plain = TableStore.from_safetensors(path, {0: "t"}, "cpu", huge_pages=False, chunk_rows=9)
    assert torch.equal(plain[0].tensor.view(torch.uint8), got.view(torch.uint8))


def test_conversions_while_loading_match_the_reference(tmp_path):
    path = tmp_path / "t.safetensors"
    t = write_table(path, dtype=torch.float32)
    f16 = TableStore.from_safetensors(path, {0: "t"}, "cpu", row_format="f16", chunk_rows=64)
    assert torch.equal(f16[0].tensor, t.to(torch.float16))
    q = TableStore.from_safetensors(path, {0: "t"}, "cpu", row_format="fp8", chunk_rows=64)
    assert q[0].fp8 and torch.equal(q[0].tensor, quantize_fp8(t))


@pytest.mark.parametrize("packed", [True, False])
def test_fp8_rows_are_bit_identical_to_safetensors(tmp_path, packed):
    src, dst = tmp_path / "t.safetensors", tmp_path / "q.safetensors"
    write_table(src, rows=500, width=64)
    quantize_table_file(src, dst, ["t"], packed=packed)
    want = old_rows(dst, "t", split=not packed)
    store = TableStore.from_safetensors(dst, {5: "t"}, "cpu", chunk_rows=33)
    assert store[5].fp8 and store[5].fmt == RowFormat("fp8", 64)
    assert torch.equal(store[5].tensor, want)
    back = TableStore.from_safetensors(dst, {5: "t"}, "cpu", row_format="bf16", chunk_rows=33)
    assert torch.equal(back[5].tensor, dequantize_fp8(want, torch.bfloat16))


def write_v41(path, rows=300, seed=1):
    """A table in DeepSeek-V4.1's layout, written by safetensors itself."""
    torch.manual_seed(seed)
    x = torch.randn(rows, 256) * torch.logspace(-3, 2, rows)[:, None]
    values, scales = quantize_fp8(x, packed=False)
    tensors = {
        f"{V41}.weight": values,
        f"{V41}.scale": scales.view(torch.float8_e8m0fnu),
        "model.layers.3.engram.other.weight": torch.ones(4, 4, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path))
    return values, scales


def test_deepseek_v41_layout_loads_as_our_fp8_rows(tmp_path):
    path = tmp_path / "v41.safetensors"
    values, scales = write_v41(path)
    assert read_header(path)[f"{V41}.scale"].dtype == "F8_E8M0"
    store = TableStore.from_safetensors(path, {3: f"{V41}.weight"}, "cpu", chunk_rows=7)
    t = store[3]
    assert t.fp8 and t.width == 256 and t.row_bytes == 264
    assert torch.equal(t.tensor, torch.cat([values.view(torch.uint8), scales], dim=1))
    rows = torch.tensor([0, 299, 17])
    ref = dequantize_fp8(values[rows], torch.bfloat16, scales=scales[rows])
    assert torch.equal(t.decode(t.tensor[rows]), ref)
    as_bf16 = TableStore.from_safetensors(path, {3: f"{V41}.weight"}, "cpu", row_format="bf16")
    assert torch.equal(as_bf16[3].tensor, dequantize_fp8(values, torch.bfloat16, scales=scales))


def test_row_formats_come_from_our_header(tmp_path):
    path = tmp_path / "v41.safetensors"
    write_v41(path)
    assert read_row_formats(path) == {"model.layers.3.engram.other.weight": RowFormat("bf16", 4)}


def one_line_error(fn) -> str:
    with pytest.raises(TableFileError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_file_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    write_table(path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    msg = one_line_error(lambda: TableStore.from_safetensors(path, {0: "t"}, "cpu"))
    assert "tensor t:" in msg and "truncated" in msg
    path.write_bytes(data[:5])
    assert "too short" in one_line_error(lambda: read_header(path))
    path.write_bytes(data[:40])
    assert "header length" in one_line_error(lambda: read_header(path))


def rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda h: h["t"].update(shape=[1000, 65]), "tensor t: 128000 bytes in data_offsets"),
        (lambda h: h["t"].update(dtype="Q9"), "tensor t: unknown dtype"),
        (lambda h: h["t"].update(data_offsets=[8, 4]), "tensor t: data_offsets"),
        (lambda h: h["t"].update(shape=[1000, -64]), "tensor t: shape"),
        (
            lambda h: h["other"].update(data_offsets=[(a := h["t"]["data_offsets"][0]), a + 56]),
            "overlap",
        ),
    ],
)
def test_corrupt_header_is_refused_naming_the_tensor(tmp_path, edit, words):
    path = tmp_path / "t.safetensors"
    write_table(path)
    rewrite_header(path, edit)
    assert words in one_line_error(lambda: TableStore.from_safetensors(path, {0: "t"}, "cpu"))


def test_tables_that_are_not_tables_are_refused(tmp_path):
    path = tmp_path / "v41.safetensors"
    write_v41(path)
    load = lambda key: TableStore.from_safetensors(path, {3: key}, "cpu")  # noqa: E731
    assert f"tensor {V41}.nope: missing" in one_line_error(lambda: load(f"{V41}.nope"))
    assert "F8_E8M0" in one_line_error(lambda: load(f"{V41}.scale"))
    rewrite_header(path, lambda h: h[f"{V41}.scale"].update(shape=[150, 16]))
    assert f"tensor {V41}.scale:" in one_line_error(lambda: load(f"{V41}.weight"))


def test_truncated_table_stops_engram_serve_with_one_line(tiny_ckpt, tmp_path):
    import shutil

    from models.checkpoint import ENGRAM_FILE, table_key

    from .live import free_port

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    data = (ckpt / ENGRAM_FILE).read_bytes()
    (ckpt / ENGRAM_FILE).write_bytes(data[:-1000])
    r = subprocess.run(
        [sys.executable, "-m", "server.launch", "--model", str(ckpt), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("engram-serve: error: model load failed:"), r.stderr
    assert "truncated" in last and table_key(2) in last
    assert "Traceback" not in r.stderr


RSS_SCRIPT = """
import json, sys
from offload.store import TableStore

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

before = status("VmRSS:")
store = TableStore.from_safetensors(sys.argv[1], {0: "t"}, "cpu", huge_pages=sys.argv[2] == "1")
print(json.dumps({"before": before, "hwm": status("VmHWM:"), "bytes": store[0].nbytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("huge_pages", [True, False])
def test_load_peak_rss_stays_near_the_table_bytes(tmp_path, huge_pages):
    path = tmp_path / "big.safetensors"
    rows = (256 << 20) // (128 * 2)  # 256 MiB of bf16 rows
    save_file({"t": torch.randn(rows, 128).bfloat16()}, str(path))
    r = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), "1" if huge_pages else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.splitlines()[-1])
    assert m["bytes"] == 256 << 20
    grew = m["hwm"] - m["before"]
    # the old path (a copy out of safetensors' mapping) peaked at ~2x the table's bytes
    assert grew <= 1.1 * m["bytes"] + (48 << 20), m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("placement", ["gpu", "host"])
def test_tables_stream_into_cuda_tiers_bit_identical(tmp_path, placement):
    from offload.store import cupy_ok

    if placement == "host" and not cupy_ok():
        pytest.skip("the pinned host tier needs CuPy")
    v41, plain = tmp_path / "v41.safetensors", tmp_path / "t.safetensors"
    write_v41(v41)
    write_table(plain)
    for path, key in ((v41, f"{V41}.weight"), (plain, "t")):
        cpu = TableStore.from_safetensors(path, {0: key}, "cpu", chunk_rows=13)
        dev = TableStore.from_safetensors(path, {0: key}, placement, "cuda", chunk_rows=13)
        assert torch.equal(dev[0].tensor.cpu(), cpu[0].tensor)
        assert dev[0].fmt == cpu[0].fmt
