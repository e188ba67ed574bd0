"""Row formats (offload.rowformat) and the engram-quantize command (offload.quantize)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.checkpoint import ENGRAM_FILE, save_checkpoint, table_key
from offload.quantize import main, quantize_table_file, read_row_formats
from offload.rowformat import (
    RowFormat,
    dequantize_fp8,
    packed_width,
    quantize_fp8,
    scale_exponents,
    split_packed,
)

from .conftest import tiny_model


def test_row_format_sizes():
    assert RowFormat("bf16", 256).row_bytes == 512
    assert RowFormat("f32", 8).row_bytes == 32
    fp8 = RowFormat("fp8", 256)
    assert (fp8.row_bytes, fp8.groups, fp8.packed) == (264, 8, True)
    assert RowFormat("fp8", 256, packed=False).row_bytes == 256
    assert RowFormat.plain(torch.bfloat16, 64) == RowFormat("bf16", 64)
    assert RowFormat.from_json(fp8.to_json()) == fp8
    assert packed_width(264) == 256 and packed_width(33) == 32


def test_row_format_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 32, got 48; keep this table in bf16"):
        RowFormat("fp8", 48)
    with pytest.raises(ValueError, match="unknown row format 'int4'"):
        RowFormat("int4", 64)
    with pytest.raises(ValueError, match="re-run engram-quantize"):
        RowFormat.from_json('{"name": "fp8"}')
    with pytest.raises(ValueError, match="not a packed FP8 row"):
        packed_width(100)
    with pytest.raises(ValueError, match="no row format for dtype"):
        RowFormat.plain(torch.int8, 4)


@pytest.mark.parametrize(
    "amax,byte",
    [
        (448.0, 127),
        (449.0, 128),
        (1.75, 119),
        (1.7500001, 120),
        (1.0, 119),
        (0.0, 0),
        (1e-45, 1),
        (3e38, 127 + 120),
    ],
)
def test_scale_byte_is_the_smallest_power_of_two_that_fits(amax, byte):
    assert scale_exponents(torch.tensor([amax], dtype=torch.float32)).item() == byte


def test_scale_bytes_match_ceil_log2_away_from_boundaries():
    g = torch.Generator().manual_seed(0)
    amax = torch.rand(2000, generator=g) * torch.exp2(torch.randint(-40, 40, (2000,)).float())
    got = scale_exponents(amax)
    want = [math.ceil(math.log2(a / 448.0)) + 127 for a in amax.tolist()]
    assert got.tolist() == want


def test_packed_layout_is_values_then_scales():
    x = torch.ones(2, 64)
    x[1, 32:] = -448.0
    packed = quantize_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 66)
    # 1.0 with scale 2**-8 is 256 = 0x78 in e4m3fn; the scale byte is -8 + 127
    assert packed[0].tolist() == [0x78] * 64 + [119, 119]
    assert packed[1, 32:64].tolist() == [0xFE] * 32 and packed[1, 65].item() == 127
    values, scales = quantize_fp8(x, packed=False)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (2, 2)
    v, s = split_packed(packed)
    assert torch.equal(v, values.view(torch.uint8)) and torch.equal(s, scales)


def test_values_round_to_nearest_even():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([448.0, 1.0625, 1.1875, -1.0625])  # scale 1; ties between codes
    out = dequantize_fp8(quantize_fp8(x), torch.float32)
    assert out[0, :4].tolist() == [448.0, 1.0, 1.25, -1.0]


def test_quantisation_error_is_within_a_sixteenth_of_the_group_max():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g)
    x *= (
        torch.exp2(torch.randint(-30, 30, (64, 8, 1), generator=g).float())
        .repeat(1, 1, 32)
        .view(64, 256)
    )
    x[3, 32:64] = 0.0
    x[4, :32] = 1e-3
    deq = dequantize_fp8(quantize_fp8(x), torch.float32)
    amax = x.abs().view(64, 8, 32).amax(2, keepdim=True)
    err = (deq - x).abs().view(64, 8, 32)
    assert bool((err <= amax * 2.0**-4).all())
    assert not deq[3, 32:64].any()


def test_dequantisation_is_exact_against_an_independent_reference():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(16, 128, generator=g) * 50).to(torch.bfloat16)
    packed = quantize_fp8(x.float())
    values, scales = split_packed(packed)
    v64 = values.view(torch.float8_e4m3fn).to(torch.float64).view(16, 4, 32)
    s64 = torch.exp2(scales.to(torch.float64) - 127)[..., None]
    ref = (v64 * s64).view(16, 128)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = dequantize_fp8(packed, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, ref.to(dtype))
    vals, sc = quantize_fp8(x.float(), packed=False)
    assert torch.equal(dequantize_fp8(vals, torch.bfloat16, scales=sc), ref.to(torch.bfloat16))


def test_quantize_refuses_bad_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_fp8(torch.zeros(2, 40))
    with pytest.raises(ValueError, match=r"want floating-point rows \[R, W\]"):
        quantize_fp8(torch.zeros(64))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8(torch.full((1, 32), float("inf")))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_fp8(torch.zeros(2, 64, dtype=torch.uint8), scales=torch.zeros(2, 3))


# --- files and the command ---------------------------------------------------------------
def _checkpoint(directory, head_dim=32, table_dtype=torch.bfloat16):
    model = tiny_model(3, engram_head_dim=head_dim)
    save_checkpoint(model, directory, table_dtype=table_dtype)
    (directory / "tokenizer.json").write_text('{"stand-in": true}')
    return model


def test_quantize_file_streams_chunks_identically(tmp_path):
    src = tmp_path / "src.safetensors"
    from safetensors.torch import save_file

    table = torch.randn(50, 64).to(torch.bfloat16)
    other = torch.arange(6, dtype=torch.int64).view(2, 3)
    save_file({"t": table, "other": other, "scalar": torch.tensor(2.5)}, str(src))
    formats = quantize_table_file(src, tmp_path / "q.safetensors", keys=["t"], chunk_rows=7)
    assert formats == {"t": RowFormat("fp8", 64)}
    got = load_file(str(tmp_path / "q.safetensors"))
    assert torch.equal(got["t"], quantize_fp8(table.float()))
    assert torch.equal(got["other"], other) and got["scalar"].item() == 2.5
    assert read_row_formats(tmp_path / "q.safetensors")["t"] == RowFormat("fp8", 64)
    assert read_row_formats(src)["t"] == RowFormat("bf16", 64)
    quantize_table_file(src, tmp_path / "s.safetensors", keys=["t"], packed=False, chunk_rows=9)
    split = load_file(str(tmp_path / "s.safetensors"))
    assert split["t"].dtype == torch.float8_e4m3fn and split["t.scales"].shape == (50, 2)
    assert torch.equal(
        dequantize_fp8(split["t"], scales=split["t.scales"]), dequantize_fp8(got["t"])
    )


def test_quantize_file_names_the_bad_table_and_leaves_no_file(tmp_path):
    from safetensors.torch import save_file

    t = torch.zeros(10, 32)
    t[7, 3] = float("nan")
    save_file({"t": t}, str(tmp_path / "src.safetensors"))
    with pytest.raises(ValueError, match=r"t, rows 6\.\.9: rows contain NaN or inf"):
        quantize_table_file(tmp_path / "src.safetensors", tmp_path / "q.safetensors", chunk_rows=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
    with pytest.raises(ValueError, match="the file being read"):
        quantize_table_file(tmp_path / "src.safetensors", tmp_path / "src.safetensors")


def test_quantize_command_round_trip(tmp_path, capsys):
    model = _checkpoint(tmp_path / "src")
    assert main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "q")]) == 0
    assert "fp8, 32 values, 33 bytes per row" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    q = load_file(str(tmp_path / "q" / ENGRAM_FILE))
    assert sorted(q) == sorted(table_key(lid) for lid in model.config.engram_layer_ids)
    with safe_open(str(tmp_path / "q" / ENGRAM_FILE), framework="pt") as f:
        recorded = json.loads(f.metadata()["engram.row_formats"])
    for lid in model.config.engram_layer_ids:
        key = table_key(lid)
        assert recorded[key] == {"name": "fp8", "values": 32, "packed": True}
        table = model.engram_table(lid).detach().to(torch.bfloat16).float()
        assert q[key].dtype == torch.uint8 and q[key].shape == (table.shape[0], 33)
        assert torch.equal(q[key], quantize_fp8(table))
        deq = dequantize_fp8(q[key], torch.float32)
        amax = table.abs().view(-1, 1, 32).amax(2, keepdim=True)
        assert bool(((deq - table).abs().view(-1, 1, 32) <= amax / 16).all())


def test_quantize_command_split_layout(tmp_path):
    _checkpoint(tmp_path / "src")
    assert (
        main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "q"), "--layout", "split"])
        == 0
    )
    formats = read_row_formats(tmp_path / "q" / ENGRAM_FILE)
    assert {f.packed for f in formats.values()} == {False}
    q = load_file(str(tmp_path / "q" / ENGRAM_FILE))
    assert any(k.endswith(".scales") for k in q)


@pytest.mark.parametrize(
    "setup,message",
    [
        ("odd-width", "a multiple of 32, got 40; keep this table in bf16"),
        ("missing", "is not a checkpoint directory (no config.json); check --model"),
        ("not-empty", "is not empty; choose a new --out"),
    ],
)
def test_quantize_command_errors_are_one_line_with_the_fix(tmp_path, capsys, setup, message):
    src, out = tmp_path / "src", tmp_path / "q"
    if setup == "odd-width":
        _checkpoint(src, head_dim=40)
    elif setup == "not-empty":
        _checkpoint(src)
        out.mkdir()
        (out / "x").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(src), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("engram-quantize: error:") and message in err[-1]
    if setup == "not-empty":
        assert (out / "x").read_text() == "keep me"
    else:
        assert not out.exists()  # no half-written copy left behind
