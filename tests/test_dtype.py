"""--dtype auto: the checkpoint's half precision on CUDA, float32 on a CPU (models/dtype.py)."""

import json

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.dtype import resolve_dtype, stored_dtype
from server.cli import parse_args

from .conftest import tiny_model

CUDA = torch.device("cuda")


def test_auto_is_the_default_of_every_entry_point():
    from bench.cli import build_parser
    from engine.config import EngineConfig

    assert EngineConfig().dtype == "auto"
    assert parse_args([]).dtype == "auto"
    assert build_parser().parse_args([]).dtype == "auto"


@pytest.mark.parametrize(
    "stored,has_bf16,want",
    [
        (torch.float32, True, torch.bfloat16),
        (torch.bfloat16, True, torch.bfloat16),
        (torch.float16, True, torch.float16),
        (None, True, torch.bfloat16),  # a synthetic model
        (torch.float32, False, torch.float16),  # a GPU without bfloat16
    ],
)
def test_auto_on_cuda_takes_the_checkpoints_half_precision(stored, has_bf16, want):
    got = resolve_dtype("auto", CUDA, stored, has_bf16=has_bf16)
    assert got.dtype == want
    assert "--dtype auto on CUDA" in str(got) and got.name in str(got)


def test_auto_on_a_cpu_is_float32_and_a_named_dtype_is_taken_as_asked():
    assert resolve_dtype("auto", "cpu", torch.bfloat16).dtype == torch.float32
    got = resolve_dtype("float16", CUDA, torch.float32, has_bf16=True)
    assert got.dtype == torch.float16 and got.why == "--dtype float16"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", "cpu", None)


def test_stored_dtype_from_the_weights_or_config_torch_dtype(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path, model_dtype=torch.bfloat16)
    assert stored_dtype(tmp_path) == torch.bfloat16  # from the safetensors header
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float16"}))
    assert stored_dtype(tmp_path) == torch.float16  # Hugging Face's field wins
    assert stored_dtype(tmp_path / "missing") is None
