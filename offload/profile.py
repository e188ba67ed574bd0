"""engram-profile: which Engram rows a corpus reads most, per layer, for a static hot-row cache.

Runs the model's own tokenizer and N-gram hasher (no weights, no tables) over a corpus, the
built-in model's stdlib corpus as ``training.corpus`` splits it by default (the held-out files;
``--split train`` for the training files) or ``--files``, and counts every row each token
reads. Writes, beside the checkpoint (``engram_hot_rows.safetensors``, or ``--out``), per layer
``layers.<id>.rows`` (int64 row ids, most read first, ties by row id) and ``layers.<id>.counts``
(int64 reads of each), with the corpus, its tokens and reads and each table's rows in the
metadata: what a later ``--hot-rows-file`` reads (:func:`read_hot_rows`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import TOKENIZER_FILE, default_model_dir
from models.config import ModelConfig
from models.hashing import NgramHasher
from models.safetensors_header import TableFileError, read_header
from models.tokenizer import EngramTokenizer

HOT_ROWS_FILE = "engram_hot_rows.safetensors"
CHUNK_TOKENS = 1 << 16  # tokens hashed at once: bounds the [tokens, heads] arrays


@dataclass
class LayerProfile:
    rows: np.ndarray  # int64 row ids, most read first
    counts: np.ndarray  # int64 reads of each
    reads: int  # every read the corpus made (the counts of rows not kept included)
    table_rows: int


def hasher_for(config: ModelConfig, tokenizer: EngramTokenizer | None) -> NgramHasher:
    """The hasher the model builds (``EngramForCausalLM``), from its config and tokenizer."""
    lookup = tokenizer.lookup if tokenizer is not None else None
    pad = config.engram_pad_token_id
    return NgramHasher(
        config.engram_vocab_size,
        config.engram_max_ngram_size,
        config.engram_n_heads,
        config.engram_layer_ids,
        config.engram_compressed_vocab_size,
        int(lookup[pad]) if lookup is not None else pad,
        config.engram_seed,
    )


def read_stream(
    hasher: NgramHasher, compressed: np.ndarray, chunk: int = CHUNK_TOKENS
) -> Iterator[dict[int, np.ndarray]]:
    """The rows the token stream reads, chunk by chunk: ``{layer: [tokens, heads]}`` global row
    ids, exactly as one sequence of those tokens hashes (history carried across chunks)."""
    history = hasher.initial_history(1)
    offsets = {lid: hasher.head_offsets(lid) for lid in hasher.layer_ids}
    for a in range(0, len(compressed), chunk):
        part = np.asarray(compressed[a : a + chunk], dtype=np.int64)
        hashed, history = hasher.hash_packed(history, part, np.array([len(part)]))
        yield {lid: h + offsets[lid] for lid, h in hashed.items()}


def count_rows(
    hasher: NgramHasher, compressed: np.ndarray, chunk: int = CHUNK_TOKENS
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (row ids, reads)}`` of every row the stream reads, row ids ascending."""
    parts: dict[int, list[np.ndarray]] = {lid: [] for lid in hasher.layer_ids}
    for step in read_stream(hasher, compressed, chunk):
        for lid, rows in step.items():
            parts[lid].append(rows.reshape(-1))
    out = {}
    for lid, ps in parts.items():
        rows = np.concatenate(ps) if ps else np.zeros(0, np.int64)
        ids, counts = np.unique(rows, return_counts=True)
        out[lid] = (ids.astype(np.int64), counts.astype(np.int64))
    return out


def rank(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows most read first, ties by ascending row id (the same file from the same corpus)."""
    order = np.lexsort((ids, -counts))
    return ids[order], counts[order]


def profile(
    hasher: NgramHasher, compressed: np.ndarray, top: float | None = None
) -> dict[int, LayerProfile]:
    """Per layer the ``top`` rows (a count, a fraction of the table's rows when < 1, or every
    row read when None), ranked."""
    out = {}
    for lid, (ids, counts) in count_rows(hasher, compressed).items():
        table = hasher.table_rows(lid)
        rows, cnt = rank(ids, counts)
        keep = len(rows) if top is None else int(top * table if top < 1 else top)
        out[lid] = LayerProfile(rows[:keep], cnt[:keep], int(counts.sum()), table)
    return out


def write_hot_rows(path: str | Path, layers: dict[int, LayerProfile], meta: dict) -> None:
    tensors, info = {}, {}
    for lid, p in layers.items():
        tensors[f"layers.{lid}.rows"] = torch.from_numpy(np.ascontiguousarray(p.rows))
        tensors[f"layers.{lid}.counts"] = torch.from_numpy(np.ascontiguousarray(p.counts))
        info[str(lid)] = {"reads": p.reads, "table_rows": p.table_rows}
    save_file(tensors, str(path), metadata={"engram.profile": json.dumps({**meta, "layers": info})})


def read_hot_rows(path: str | Path) -> dict[int, LayerProfile]:
    """A profile written by engram-profile (TableFileError when it is not one)."""
    header = read_header(path)
    try:
        meta = json.loads(header.metadata["engram.profile"])
        layers = {int(k): v for k, v in meta["layers"].items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise TableFileError(
            f"{path}: no engram.profile metadata; write it with engram-profile"
        ) from None
    for lid in layers:
        for part in ("rows", "counts"):
            t = header.tensors.get(f"layers.{lid}.{part}")
            if t is None or t.dtype != "I64" or len(t.shape) != 1:
                raise TableFileError(f"{path}: tensor layers.{lid}.{part}: want int64 [N]")
    data = load_file(str(path))
    out = {}
    for lid, v in layers.items():
        rows, counts = data[f"layers.{lid}.rows"].numpy(), data[f"layers.{lid}.counts"].numpy()
        if rows.shape != counts.shape or (
            rows.size and not 0 <= rows.min() <= rows.max() < v["table_rows"]
        ):
            raise TableFileError(f"{path}: tensor layers.{lid}.rows: ids outside the table")
        out[lid] = LayerProfile(rows, counts, int(v["reads"]), int(v["table_rows"]))
    return out


def corpus_ids(
    tokenizer: EngramTokenizer,
    split: str = "val",
    files: list[str] | None = None,
    max_files: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, str]:
    """Raw token ids of the corpus (files each followed by EOS) and a description of it."""
    from training.corpus import encode_files, split_files

    if files:
        paths, what = [Path(f) for f in files], f"{len(files)} files"
    else:
        train, val = split_files()
        paths, what = (val if split == "val" else train), f"stdlib {split} split"
    paths = paths[:max_files] if max_files else paths
    ids = encode_files(tokenizer.tokenizer, paths, f"encoding {what}", progress)
    return ids, what


def parse_top(text: str) -> float | None:
    if text == "all":
        return None
    v = float(text)
    if v <= 0 or (v >= 1 and v != int(v)):
        raise ValueError(f"--top {text}: want 'all', a row count, or a fraction under 1")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engram-profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="which stdlib files to read (the built-in model's split)",
    )
    ap.add_argument("--files", nargs="*", default=None, help="text files to read instead")
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument(
        "--top",
        default="all",
        help="rows kept per layer: 'all' read, a count, or a fraction of the table",
    )
    ap.add_argument("--out", default=None, help=f"output file (default: <model>/{HOT_ROWS_FILE})")
    args = ap.parse_args(argv)
    model_dir = Path(args.model) if args.model else default_model_dir()
    try:
        top = parse_top(args.top)
        config = ModelConfig.load(model_dir)
        tokenizer = EngramTokenizer.from_file(model_dir / TOKENIZER_FILE)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    ids, what = corpus_ids(
        tokenizer, args.split, args.files, args.max_files, progress=sys.stderr.isatty()
    )
    layers = profile(hasher_for(config, tokenizer), tokenizer.compress(ids), top)
    out = Path(args.out) if args.out else model_dir / HOT_ROWS_FILE
    write_hot_rows(out, layers, {"corpus": what, "tokens": int(len(ids))})
    for lid, p in layers.items():
        share = p.counts.sum() / max(p.reads, 1)
        print(
            f"layer {lid}: {len(p.rows)} of {p.table_rows} rows kept "
            f"({len(p.rows) / p.table_rows:.2%}), {share:.1%} of {p.reads} reads"
        )
    print(f"wrote {out} ({what}, {len(ids)} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
