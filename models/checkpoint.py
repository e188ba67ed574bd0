"""Checkpoint directory I/O: config.json, model.safetensors, engram.safetensors, tokenizer.json.

The same loader reads a Hugging Face directory of a supported family (models/hf_config.py):
``model.safetensors`` or the shards ``model.safetensors.index.json`` names, each tensor read
from the memory-mapped file and converted alone (never the whole checkpoint copied at once).
Only safetensors and JSON are read. Engram tables live in their own file so the offload
engine can stream them into pinned host memory without the model (or the GPU) holding them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .hf_config import UnsupportedModel
from .hf_files import GenerationDefaults
from .llama import EngramForCausalLM, rope_cache
from .safetensors_header import read_header
from .tinyengram import our_key
from .tokenizer import EngramTokenizer

MODEL_FILE = "model.safetensors"
ENGRAM_FILE = "engram.safetensors"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


def default_model_dir() -> Path:
    """The built-in default model shipped with the package."""
    return Path(__file__).resolve().parent / "default"


def table_key(layer_id: int) -> str:
    return f"model.layers.{layer_id}.engram.multi_head_embedding.embedding.weight"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _expected_keys(model: EngramForCausalLM) -> set[str]:
    keys = set(model.state_dict().keys())
    if model.config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def save_checkpoint(
    model: EngramForCausalLM,
    directory: str | Path,
    tokenizer: EngramTokenizer | None = None,
    table_dtype: torch.dtype = torch.bfloat16,
    model_dtype: torch.dtype | None = None,
) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out)
    tables = {table_key(lid) for lid in model.config.engram_layer_ids}
    backbone, engram = {}, {}
    for k, v in model.state_dict().items():
        if k not in _expected_keys(model):
            continue
        v = v.detach().cpu().contiguous()
        if k in tables:
            engram[k] = v.to(table_dtype)
        else:
            backbone[k] = v.to(model_dtype) if model_dtype and v.is_floating_point() else v
    save_file(backbone, str(out / MODEL_FILE), metadata={"format": "pt"})
    if engram:
        save_file(engram, str(out / ENGRAM_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.tokenizer.save(str(out / TOKENIZER_FILE))
    return out


def weight_files(directory: Path) -> list[Path]:
    """The backbone's safetensors files: the shards the index names, or model.safetensors.
    Pickled weights are refused (they would run code on load)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} has no valid weight_map: {e}") from e
        files = [directory / n for n in names]
    elif (directory / MODEL_FILE).is_file():
        files = [directory / MODEL_FILE]
    else:
        pickled = sorted(p.name for pat in PICKLED for p in directory.glob(pat))
        if pickled:
            raise UnsupportedModel(
                f"weights {pickled[0]} are pickled and not loaded; supported: model.safetensors "
                f"or shards named by {INDEX_FILE} (save_pretrained(safe_serialization=True))"
            )
        raise CheckpointError(f"checkpoint file {directory / MODEL_FILE} is missing")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
    return files


def checkpoint_files(directory: Path, config: ModelConfig) -> list[Path]:
    """Every safetensors file of the checkpoint: the weights, plus engram.safetensors where
    the Engram layers keep their own file (this project's format; TinyEngram's are among the
    weights)."""
    files = weight_files(directory)
    if config.engram_layer_ids and not is_tinyengram(directory):
        if not (directory / ENGRAM_FILE).is_file():
            raise CheckpointError(f"checkpoint file {directory / ENGRAM_FILE} is missing")
        files.append(directory / ENGRAM_FILE)
    return files


def table_files(directory: str | Path, layer_ids: list[int]) -> dict[Path, dict[int, str]]:
    """Where each layer's table is stored: ``{file: {layer: key in that file}}``."""
    directory = Path(directory)
    wanted = {table_key(lid): lid for lid in layer_ids}
    if not layer_ids:
        return {}
    if not is_tinyengram(directory):
        return {directory / ENGRAM_FILE: {lid: table_key(lid) for lid in layer_ids}}
    out: dict[Path, dict[int, str]] = {}
    for f in weight_files(directory):
        for k in file_keys(f):
            if our_key(k) in wanted:
                out.setdefault(f, {})[wanted[our_key(k)]] = k
    return out


def is_tinyengram(directory: Path) -> bool:
    return GenerationDefaults.read(directory).engram_cfg is not None


def _ignored(key: str, config: ModelConfig) -> bool:
    """Keys a Hugging Face file may hold that the model recomputes or shares."""
    return key.endswith("rotary_emb.inv_freq") or (
        key == "lm_head.weight" and config.tie_word_embeddings
    )


def file_keys(path: Path) -> list[str]:
    """The tensors of a safetensors file, its header checked against the file first (a
    truncated or corrupt file is a TableFileError naming the tensor)."""
    return list(read_header(path).tensors)


def load_checkpoint(
    directory: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    load_tables: bool = True,
) -> tuple[EngramForCausalLM, EngramTokenizer | None]:
    """Load a checkpoint; with ``load_tables=False`` the Engram tables stay unloaded (meta)
    for the offload engine to place."""
    directory = Path(directory) if directory is not None else default_model_dir()
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    dtype = parse_dtype(dtype)
    config = ModelConfig.load(directory)
    tokenizer = None
    if (directory / TOKENIZER_FILE).is_file():
        tokenizer = EngramTokenizer.from_file(directory / TOKENIZER_FILE)
        if tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(
                f"tokenizer has {tokenizer.vocab_size} tokens but config vocab_size is "
                f"{config.vocab_size}; fix vocab_size in config.json"
            )
    if is_tinyengram(directory) and config.engram_layer_ids:
        if tokenizer is None:
            raise CheckpointError(f"{directory}: a TinyEngram checkpoint needs its tokenizer.json")
        # the reference hashes over its compressed tokenizer's size
        config.engram_compressed_vocab_size = tokenizer.compressed_vocab_size
    use_lookup = tokenizer is not None and config.engram_layer_ids
    compression = tokenizer.lookup if use_lookup else None
    with torch.device("meta"):
        model = EngramForCausalLM(config, compression)

    files = checkpoint_files(directory, config)
    tables = {table_key(lid) for lid in config.engram_layer_ids}
    found: dict[str, tuple[Path, str]] = {}  # our key -> (file, key in the file)
    for f in files:
        for k in file_keys(f):
            ours = our_key(k)
            if ours.endswith(".scales") and ours[: -len(".scales")] in tables:
                continue  # fp8 tables in engram-quantize's split layout: scales beside values
            if not _ignored(ours, config):
                found[ours] = (f, k)
    expected = _expected_keys(model)
    # each head's row offset is a buffer the hasher fixes; a file may leave it out
    offsets = {
        f"model.layers.{lid}.engram.multi_head_embedding.offsets": lid
        for lid in config.engram_layer_ids
    }
    missing = sorted(expected - set(found) - set(offsets))
    unexpected = sorted(set(found) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not match the config: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
        )

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                ours = our_key(k)
                if found.get(ours) != (f, k) or (ours in tables and not load_tables):
                    continue
                t = sf.get_tensor(k)  # one tensor from the memory map, converted alone
                if ours in tables and (not t.is_floating_point() or t.dtype == torch.float8_e4m3fn):
                    raise CheckpointError(
                        f"{k} holds FP8 rows (engram-quantize output); load the tables through "
                        "offload (OffloadedModel.load, engram-eval --row-format)"
                    )
                if t.is_floating_point():
                    t = t.to(dtype)
                state[ours] = t.to(device)
    for key, lid in offsets.items():
        state.setdefault(key, torch.from_numpy(model.hasher.head_offsets(lid)).to(device))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_cache(config, device)
    return model.eval(), tokenizer
