"""Random-weight models with the shapes of real dense LLMs, for the offload benchmark.

The backbone is built on the meta device and materialised straight on the target device; the
Engram tables are never materialised with it. They are allocated only in a
:class:`~offload.store.TableStore` (pinned host memory when offloaded) and filled with random
rows chunk by chunk. Each chunk comes from its own seeded generator, so a GPU store and a host
store of the same model hold identical rows and every benchmark row sees the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import table_key
from models.config import ModelConfig
from models.llama import EngramForCausalLM, init_weights, rope_cache
from offload.store import Placement, TableStore


@dataclass(frozen=True)
class Shape:
    """Backbone fields, named as in :class:`~models.config.ModelConfig`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float


# Shapes like public 4B / 8B dense models (GQA). Head dim 128 in both: this backbone derives
# it as hidden_size / num_attention_heads.
SHAPES = {
    "dense-4b-like": Shape(2560, 9728, 36, 20, 4, 151936, True, 1e6),
    "dense-8b-like": Shape(4096, 14336, 32, 32, 8, 128256, False, 5e5),
}

# Engram layout as the public reference builds it: 2- and 3-grams, 8 heads per order,
# 512 values per order (head dim 64), at the second layer.
ENGRAM_LAYER = 1
ENGRAM_DEFAULTS = dict(
    engram_layer_ids=[ENGRAM_LAYER],
    engram_max_ngram_size=3,
    engram_n_heads=8,
    engram_head_dim=64,
    engram_kernel_size=4,
    engram_pad_token_id=0,
    engram_seed=0,
)


def synthetic_config(
    name: str, engram_params: float, layers: int | None = None, **overrides
) -> ModelConfig:
    """Config of a synthetic model; engram_vocab_size is chosen so the Engram tables hold about
    ``engram_params`` parameters (rows x head dim) unless overrides set it."""
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; use one of {', '.join(SHAPES)}")
    if engram_params <= 0:
        raise ValueError(f"--engram-params must be positive, got {engram_params:g}")
    cfg = dict(**asdict(SHAPES[name]), max_position_embeddings=4096, **ENGRAM_DEFAULTS)
    if layers is not None:
        if layers <= ENGRAM_LAYER:
            raise ValueError(
                f"--layers {layers} leaves no layer {ENGRAM_LAYER} for Engram; use 2 or more"
            )
        cfg["num_hidden_layers"] = layers
    cfg.update(overrides)
    # identity compression: every token id is its own compressed id
    cfg.setdefault("engram_compressed_vocab_size", cfg["vocab_size"])
    if "engram_vocab_size" not in overrides:
        heads = (cfg["engram_max_ngram_size"] - 1) * cfg["engram_n_heads"]
        per_head = max(2, round(engram_params / (heads * cfg["engram_head_dim"])))
        cfg["engram_vocab_size"] = [per_head] * (cfg["engram_max_ngram_size"] - 1)
    return ModelConfig(**cfg).validate()


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def build_synthetic_model(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> EngramForCausalLM:
    """Random backbone on ``device``; the Engram tables stay on meta (see module docstring)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = EngramForCausalLM(config).to(dtype)
    embeddings = {}
    for lid in config.engram_layer_ids:
        mhe = model.model.layers[lid].engram.multi_head_embedding
        embeddings[lid] = mhe.embedding
        mhe.embedding = None  # keeps to_empty() from materialising the table
    model.to_empty(device=device)
    for lid, emb in embeddings.items():
        mhe = model.model.layers[lid].engram.multi_head_embedding
        mhe.embedding = emb
        mhe.offsets = torch.from_numpy(model.hasher.head_offsets(lid)).to(device)
    if config.tie_word_embeddings:  # to_empty() gives each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_cache(config, device)

    tables = {table_key(lid) for lid in config.engram_layer_ids}
    init_weights(model, torch.Generator(device).manual_seed(seed), skip=tables)
    return model.eval()


def table_shapes(model: EngramForCausalLM) -> dict[int, tuple[int, int]]:
    """Rows x width of each Engram table (read from the meta tensors: nothing is allocated)."""
    return {lid: tuple(model.engram_table(lid).shape) for lid in model.config.engram_layer_ids}


def engram_param_count(model: EngramForCausalLM) -> int:
    return sum(model.engram_table(lid).numel() for lid in model.config.engram_layer_ids)


def fill_random_rows(
    store: TableStore,
    seed: int = 0,
    gen_device: torch.device | str = "cpu",
    chunk_rows: int = 1 << 20,
    progress: bool = True,
) -> TableStore:
    """Fill every table with N(0, 1) rows, one seeded chunk at a time on ``gen_device`` (the
    same gen_device always gives the same rows, whatever tier the store is in)."""
    gen_device = torch.device(gen_device)
    total = sum(t.rows for t in store.tables.values())
    with tqdm(
        total=total, desc="random Engram rows", unit="row", unit_scale=True, disable=not progress
    ) as bar:
        for lid, table in store.tables.items():
            dst = table.tensor
            for k, a in enumerate(range(0, table.rows, chunk_rows)):
                n = min(chunk_rows, table.rows - a)
                gen = torch.Generator(gen_device).manual_seed(_seed(seed, lid, k))
                rows = torch.randn(
                    (n, dst.shape[1]), generator=gen, device=gen_device, dtype=torch.float32
                )
                dst[a : a + n].copy_(rows.to(dst.dtype))
                bar.update(n)
    return store


def random_store(
    model: EngramForCausalLM,
    placement: Placement | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    progress: bool = True,
) -> TableStore:
    """The model's Engram tables, allocated only in ``placement`` and filled with random rows
    (generated on the GPU when there is one: the chunks pass through, the table never does)."""
    device = torch.device(device)
    store = TableStore.allocate(table_shapes(model), dtype, placement, device)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return fill_random_rows(store, seed, gen_device, progress=progress)
