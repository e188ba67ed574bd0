"""``engram-attach BASE OUT --layers 1,15 --table-params 5e9``: Engram layers on a supported
Hugging Face backbone, untrained.

OUT is a servable directory: BASE's files hard-linked (not copied; OUT must be on the same
filesystem), config.json rewritten with the Engram fields, and engram.safetensors written
chunk by chunk with fresh modules initialised as the reference does (tables N(0, 1), key
projections as torch's Linear, norms 1, ShortConv 0) except the value projection, zeroed as
the reference's training script zeroes it: every Engram layer then adds exactly 0, so the new
model's logits equal the base model's until it is trained.

--table-params is the tables' total over all layers (rows x head dim); it is split evenly
over layers, n-gram orders and heads, each head's size the next unused prime above its share.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from .checkpoint import ENGRAM_FILE, TOKENIZER_FILE, table_key
from .config import ModelConfig
from .hashing import NgramHasher
from .hf_config import is_hf_config
from .safetensors_stream import StreamedTensor, write_streamed
from .tokenizer import EngramTokenizer

CHUNK_ROWS = 1 << 16


def engram_settings(
    config: ModelConfig,
    tok: EngramTokenizer,
    layers: list[int],
    table_params: float,
    ngram: int,
    heads: int,
    head_dim: int,
    seed: int,
    kernel_size: int,
    pad_token_id: int,
) -> dict:
    """The Engram fields config.json gets."""
    orders = ngram - 1
    per_head = int(table_params / (len(layers) * orders * heads * head_dim))
    if per_head < 2:
        raise ValueError(f"--table-params {table_params:g} leaves under 2 rows per head")
    return dict(
        engram_layer_ids=sorted(layers),
        engram_max_ngram_size=ngram,
        engram_n_heads=heads,
        engram_head_dim=head_dim,
        engram_vocab_size=[per_head] * orders,
        engram_compressed_vocab_size=tok.compressed_vocab_size,
        engram_pad_token_id=pad_token_id,
        engram_seed=seed,
        engram_kernel_size=kernel_size,
        hc_mult=1,
    )


def _rows(shape, dtype, generator, fill=None):
    """Chunks of a [R, W] tensor: N(0, 1) (``fill`` None) or a constant."""

    def chunks():
        rows, width = shape
        for a in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - a)
            if fill is None:
                yield torch.randn(n, width, generator=generator).to(dtype)
            else:
                yield torch.full((n, width), fill, dtype=dtype)

    return chunks


def _whole(t: torch.Tensor):
    return lambda: iter([t])


def engram_tensors(config: ModelConfig, table_dtype, dtype, seed: int) -> list[StreamedTensor]:
    """Every Engram parameter and buffer under this project's names, streamed."""
    hasher = NgramHasher(
        config.engram_vocab_size,
        config.engram_max_ngram_size,
        config.engram_n_heads,
        config.engram_layer_ids,
        config.engram_compressed_vocab_size,
        0,
        config.engram_seed,
    )
    gen = torch.Generator().manual_seed(seed)
    d, k = config.hidden_size, config.engram_kernel_size
    e = config.engram_hidden_size
    out = []
    for lid in config.engram_layer_ids:
        p = f"model.layers.{lid}.engram."
        rows = hasher.table_rows(lid)
        offsets = torch.from_numpy(hasher.head_offsets(lid)).long()
        # torch's Linear init (the reference's): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        key_w = torch.empty(d, e).uniform_(-1, 1, generator=gen) / math.sqrt(e)
        key_b = torch.empty(d).uniform_(-1, 1, generator=gen) / math.sqrt(e)
        small = {
            "multi_head_embedding.offsets": offsets,
            "short_conv.conv.weight": torch.zeros(d, 1, k, dtype=dtype),
            "short_conv.norms.0.weight": torch.ones(d, dtype=dtype),
            "value_proj.weight": torch.zeros(d, e, dtype=dtype),  # zero: adds exactly 0
            "value_proj.bias": torch.zeros(d, dtype=dtype),
            "key_projs.0.weight": key_w.to(dtype),
            "key_projs.0.bias": key_b.to(dtype),
            "norm1.0.weight": torch.ones(d, dtype=dtype),
            "norm2.0.weight": torch.ones(d, dtype=dtype),
        }
        shape = (rows, config.engram_head_dim)
        out.append(
            StreamedTensor(table_key(lid), table_dtype, shape, _rows(shape, table_dtype, gen))
        )
        for name, t in small.items():
            out.append(StreamedTensor(p + name, t.dtype, tuple(t.shape), _whole(t)))
    return out


def link_base(base: Path, out: Path) -> list[str]:
    """Hard-link BASE's files into OUT (config.json excepted); the names linked."""
    out.mkdir(parents=True, exist_ok=True)
    linked = []
    for f in sorted(base.iterdir()):
        if not f.is_file() or f.name in ("config.json", ENGRAM_FILE):
            continue
        target = out / f.name
        if target.exists():
            target.unlink()
        try:
            os.link(f, target)
        except OSError as e:
            raise OSError(
                f"cannot hard-link {f} into {out} ({e.strerror}); put OUT on BASE's filesystem"
            ) from e
        linked.append(f.name)
    return linked


def attach(base: Path, out: Path, layers: list[int], table_params: float, **opts) -> Path:
    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise ValueError("OUT must be a new directory, not BASE")
    data = json.loads((base / "config.json").read_text())
    if not is_hf_config(data):
        raise ValueError(f"{base} is not a Hugging Face checkpoint (config.json model_type)")
    if any(k.startswith("engram_") for k in data):
        raise ValueError(f"{base} has Engram layers already")
    config = ModelConfig.load(base)  # refuses unsupported families with the reason
    if not (base / TOKENIZER_FILE).is_file():
        raise ValueError(f"{base} has no tokenizer.json (the Engram hash compresses its ids)")
    tok = EngramTokenizer.from_file(base)
    table_dtype = opts.pop("table_dtype", torch.bfloat16)
    seed = opts.get("seed", 0)
    pad = opts.pop("pad_token_id", None)
    if pad is None:
        pad = config.eos_token_id if config.eos_token_id is not None else 0
    fields = engram_settings(config, tok, layers, table_params, pad_token_id=pad, **opts)
    engram_config = ModelConfig(**{**config.to_dict(), **fields}).validate()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        data.get("torch_dtype") or data.get("dtype"), torch.float32
    )
    link_base(base, out)
    (out / "config.json").write_text(json.dumps({**data, **fields}, indent=2) + "\n")
    write_streamed(out / ENGRAM_FILE, engram_tensors(engram_config, table_dtype, dtype, seed))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="engram-attach",
        description="Add untrained Engram layers to a Hugging Face backbone (logits unchanged).",
    )
    ap.add_argument("base", help="Hugging Face checkpoint directory (Llama/Qwen2/Qwen3/Mistral)")
    ap.add_argument("out", help="output directory (same filesystem: base files are hard-linked)")
    ap.add_argument("--layers", required=True, help="0-based decoder layers, e.g. 1,15")
    ap.add_argument(
        "--table-params", type=float, required=True, help="table parameters, all layers"
    )
    ap.add_argument("--ngram", type=int, default=3, help="max n-gram order")
    ap.add_argument("--heads", type=int, default=8, help="hash heads per n-gram order")
    ap.add_argument("--head-dim", type=int, default=32, help="values per table row")
    ap.add_argument("--kernel-size", type=int, default=4, help="ShortConv kernel")
    ap.add_argument("--seed", type=int, default=0, help="hash multipliers and init")
    ap.add_argument("--pad-token-id", type=int, default=None, help="default: the EOS id")
    ap.add_argument("--table-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
        out = attach(
            Path(args.base),
            Path(args.out),
            layers,
            args.table_params,
            ngram=args.ngram,
            heads=args.heads,
            head_dim=args.head_dim,
            seed=args.seed,
            kernel_size=args.kernel_size,
            pad_token_id=args.pad_token_id,
            table_dtype=getattr(torch, args.table_dtype),
        )
    except (OSError, ValueError) as e:
        print(f"engram-attach: error: {e}", file=sys.stderr)
        return 2
    print(f"engram-attach: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
