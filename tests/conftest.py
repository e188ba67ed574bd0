from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (set before any kernel module imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic mode (engram-bench's default) needs this before the process's first CUDA
# matmul: torch reads it once (engine/determinism.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from models.config import ModelConfig
from models.llama import EngramForCausalLM

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data"
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run (or interpret)


def tiny_config(**overrides) -> ModelConfig:
    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        engram_layer_ids=[0, 2],
        engram_max_ngram_size=3,
        engram_n_heads=2,
        engram_head_dim=8,
        engram_vocab_size=[101, 211],
        engram_compressed_vocab_size=300,
        engram_pad_token_id=2,
        engram_seed=5,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg).validate()


def tiny_model(seed: int = 0, **overrides) -> EngramForCausalLM:
    """A random model whose weights are large enough that every path moves the logits."""
    torch.manual_seed(seed)
    m = EngramForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


@pytest.fixture
def golden() -> Path:
    return GOLDEN


def new_seq(cache: KVCache) -> Sequence:
    """A running sequence with a conv slot, for driving the model runner directly."""
    seq = Sequence("test", 0, [], SamplingParams(), torch.Generator())
    cache.admit(seq)
    return seq


def tiny_checkpoint(directory: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """A small random model with a real byte-level BPE tokenizer, saved as a checkpoint."""
    from models.checkpoint import save_checkpoint
    from models.tokenizer import EngramTokenizer
    from training.corpus import EOS, split_files, train_tokenizer

    train, _ = split_files()
    tok = EngramTokenizer(train_tokenizer(train[:20], vocab_size))
    eos = tok.token_id(EOS)
    torch.manual_seed(seed)
    cfg = tiny_config(
        vocab_size=tok.vocab_size,
        engram_compressed_vocab_size=tok.compressed_vocab_size,
        engram_pad_token_id=eos,
        eos_token_id=eos,
        max_position_embeddings=512,
    )
    model = EngramForCausalLM(cfg, tok.lookup).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_checkpoint(model, directory, tok, table_dtype=torch.float32)
    return directory


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


def compile_for_h100(script: str, cache_dir: Path) -> None:
    """Run ``script`` (which compiles Triton kernels for sm_90 and prints "ok") with Triton's
    real compiler, not the interpreter; skip where this Triton cannot compile for a target
    (exit 3) or does not show what the script reads (exit 4)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    # PYTHONPATH kept first: CI runs these with another Triton (a --target dir) in front
    env.update(PYTHONPATH=path, TRITON_CACHE_DIR=str(cache_dir), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if r.returncode == 3:
        pytest.skip("this Triton has no ASTSource/GPUTarget compile API")
    if r.returncode == 4:
        pytest.skip("this Triton does not print ptxas's log (TRITON_DUMP_PTXAS_LOG)")
    if "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    """A real uvicorn server on the tiny checkpoint, one per test module."""
    from .live import serve

    with serve(
        tiny_ckpt, served_model_name=["tiny-ckpt0"], max_num_seqs=8, max_num_batched_tokens=64
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
