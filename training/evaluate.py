"""``engram-eval``: validation loss and perplexity on the held-out stdlib files.

Rows: the model (once per ``--row-format``); the same model with every Engram output zeroed;
optionally a dense baseline trained with the same recipe (``engram-train --dense``). Prints a
Markdown table.

    engram-eval --dense runs/dense
    engram-eval --row-format bf16 fp8    # the held-out cost of FP8 Engram rows

A row format loads the tables the way the server does (``offload.store``: quantised at load
for 'fp8', or as stored) and decodes them as a gather returns them, so the model reads exactly
the rows it would be served.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import default_model_dir, load_checkpoint
from models.llama import EngramForCausalLM
from offload.store import ROW_FORMATS, TableStore

from .corpus import encode_files, split_files


def validation_ids(tokenizer, max_files: int | None = None, progress: bool = True) -> np.ndarray:
    _, val = split_files()
    files = val[:max_files] if max_files else val
    return encode_files(tokenizer, files, "encoding val", progress)


@torch.inference_mode()
def validation_loss(
    model: EngramForCausalLM,
    ids: np.ndarray,
    seq_len: int = 256,
    batch_size: int = 8,
    engram_scale: float = 1.0,
    progress: bool = True,
    bar: tqdm | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows of the stream.
    ``bar``: a progress bar to advance by each batch's windows (instead of one of its own)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"need more than {seq_len} validation tokens, got {len(ids)}")
    x_all = np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    y_all = np.asarray(ids[1 : n * seq_len + 1], dtype=np.int64).reshape(n, seq_len)
    total = 0.0
    own = bar is None
    if own:
        bar = tqdm(total=n, desc="eval", unit="window", leave=False, disable=not progress)
    for i in range(0, n, batch_size):
        x = torch.from_numpy(x_all[i : i + batch_size])
        y = torch.from_numpy(y_all[i : i + batch_size])
        logits = model.forward_full(x, engram_scale=engram_scale).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        bar.update(len(x))
    if own:
        bar.close()
    return total / (n * seq_len)


def run_rows(
    rows: list[tuple[str, Callable[[tqdm | None], float]]],
    windows: int,
    terminal: bool,
    say: Callable[[str], None],
) -> list[tuple[str, float]]:
    """Each row's loss. At a terminal: one bar over every row's windows (its time left is the
    whole run's). Elsewhere (a log, CI): no bar; one line per row with the time it took and an
    estimate of the time left, from the rows so far."""
    out, started = [], time.perf_counter()
    bar = tqdm(total=windows * len(rows), desc="engram-eval", unit="window") if terminal else None
    for k, (name, run) in enumerate(rows, start=1):
        if bar is not None:
            bar.set_postfix_str(name)
        t = time.perf_counter()
        out.append((name, run(bar)))
        if bar is None:
            spent = time.perf_counter() - started
            left = spent / k * (len(rows) - k)
            say(
                f"engram-eval: {k}/{len(rows)} {name}: {time.perf_counter() - t:.1f}s "
                f"(about {left:.0f}s left)"
            )
    if bar is not None:
        bar.close()
    return out


def load_with_row_format(
    model_dir: str | Path | None, row_format: str
) -> tuple[EngramForCausalLM, object]:
    """A checkpoint whose Engram tables hold the rows a gather returns in ``row_format``."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    model, tok = load_checkpoint(model_dir, load_tables=False)
    store = TableStore.from_checkpoint(
        model_dir,
        model.config.engram_layer_ids,
        "cpu",
        progress=False,
        row_format=row_format,
        row_dtype=torch.float32,
        huge_pages=False,
    )
    for lid, table in store.tables.items():
        rows = table.decode(table.tensor).to(torch.float32)
        emb = model.model.layers[lid].engram.multi_head_embedding.embedding
        emb.weight = torch.nn.Parameter(rows, requires_grad=False)
    return model, tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engram-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--dense", default=None, help="dense baseline checkpoint directory")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument(
        "--row-format",
        nargs="+",
        choices=ROW_FORMATS,
        default=["auto"],
        help="Engram table row formats to evaluate, one row each (auto: as stored; fp8: "
        "quantised at load as the server does)",
    )
    args = ap.parse_args(argv)
    if args.max_files is not None and args.max_files < 1:
        ap.error("--max-files must be at least 1 (leave it out for every held-out file)")
    try:
        models = {fmt: load_with_row_format(args.model, fmt) for fmt in args.row_format}
        dense = load_checkpoint(Path(args.dense)) if args.dense else None
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        ap.error(str(e))
    model, tok = next(iter(models.values()))
    if dense is not None and dense[1].tokenizer.to_str() != tok.tokenizer.to_str():
        ap.error(f"{args.dense} uses another tokenizer; train it with --tokenizer-from")
    terminal = sys.stderr.isatty()
    ids = validation_ids(tok.tokenizer, args.max_files, progress=terminal)
    if len(ids) <= args.seq_len:
        ap.error(f"{len(ids)} held-out tokens do not fill one --seq-len {args.seq_len} window")

    def row(m, scale: float = 1.0):
        return lambda bar: validation_loss(
            m, ids, args.seq_len, engram_scale=scale, progress=terminal, bar=bar
        )

    todo = [
        ("Engram model" if fmt == "auto" else f"Engram model, {fmt} Engram rows", row(m))
        for fmt, (m, _) in models.items()
    ]
    todo.append(("Engram model, Engram outputs zeroed", row(model, 0.0)))
    if dense is not None:
        todo.append(("Dense baseline (same recipe, no Engram)", row(dense[0])))
    windows = (len(ids) - 1) // args.seq_len
    rows = run_rows(todo, windows, terminal, lambda line: print(line, file=sys.stderr))
    print(f"validation: {len(ids)} tokens from held-out stdlib files, windows of {args.seq_len}")
    print()
    print("| model | val loss (nats/token) | perplexity |")
    print("| --- | ---: | ---: |")
    for name, loss in rows:
        print(f"| {name} | {loss:.4f} | {math.exp(loss):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
