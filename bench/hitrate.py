"""Hit rate of an Engram row cache against its size, on real text: ``python -m bench.hitrate``.

Reads: the held-out stdlib files (the built-in model's validation split), tokenized by the
built-in model's tokenizer and hashed, as one stream, by each layer's hasher: the built-in
model's Engram layers, and a DeepSeek-V4.1-sized layer (384M rows: orders 2-4, 8 heads each,
16M rows a head; hashing only, no table). For cache sizes of 0.01% .. 20% of a layer's rows:

- static: the hot set ``engram-profile`` would pick from the training files, applied to the
  held-out reads (and, as the ceiling of any static set, the held-out reads' own top rows);
- adaptive on the held-out stream: LRU and a count-driven cache refreshed every
  ``--refresh-tokens`` tokens from counts decayed by ``--decay`` per refresh, both starting
  empty; and the count-driven cache starting from the training profile's counts
  (``bench.cache_sim``).

Writes ``hit_rate.json`` (every figure, the settings, provenance) and ``hit_rate.png`` to
``--out`` (default ``bench/results/<date>-cpu-hit-rate``). Deterministic: no repeats needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.checkpoint import TOKENIZER_FILE, default_model_dir
from models.config import ModelConfig
from models.hashing import NgramHasher
from models.tokenizer import EngramTokenizer
from offload.profile import corpus_ids, count_rows, hasher_for, rank, read_stream

from .cache_sim import lru_hits, refreshed_lfu_hits, seen_before_hits, static_hits
from .provenance import git_commit

FRACTIONS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
V41_HEAD_ROWS = 16_000_000  # 3 orders x 8 heads x 16M = 384M rows
POLICIES = ("static_profile", "lru", "refreshed_lfu", "profile_refreshed_lfu")
TARGET = (0.05, 0.5)  # at least half of all reads hit a cache of at most 5% of rows


def v41_hasher(config: ModelConfig, tokenizer: EngramTokenizer) -> NgramHasher:
    """A V4.1-sized layer hashing the built-in model's compressed tokens."""
    pad = int(tokenizer.lookup[config.engram_pad_token_id])
    return NgramHasher([V41_HEAD_ROWS] * 3, 4, 8, [0], tokenizer.compressed_vocab_size, pad, 0)


def stream_rows(hasher: NgramHasher, compressed: np.ndarray) -> dict[int, np.ndarray]:
    """Each layer's reads in order: token after token, a token's heads in head order."""
    parts = {lid: [] for lid in hasher.layer_ids}
    for step in read_stream(hasher, compressed):
        for lid, rows in step.items():
            parts[lid].append(rows.reshape(-1))
    return {lid: np.concatenate(p) for lid, p in parts.items()}


def measure_layer(
    name: str, table_rows: int, train: tuple, reads: np.ndarray, args, heads: int
) -> dict:
    sizes = [max(1, int(f * table_rows)) for f in FRACTIONS]
    n = len(reads)
    t0 = time.perf_counter()
    profile_rows, _ = rank(*train)
    own_rows, _ = rank(*np.unique(reads, return_counts=True))
    refresh = args.refresh_tokens * heads
    out = {
        "layer": name,
        "table_rows": table_rows,
        "reads": n,
        "distinct_rows_read": int(len(own_rows)),
        "profile_rows": int(len(profile_rows)),
        "profile_rows_share_of_table": len(profile_rows) / table_rows,
        "sizes_rows": sizes,
        "fractions": list(FRACTIONS),
        "static_profile": [h / n for h in static_hits(reads, profile_rows, sizes)],
        "static_profile_every_row_seen": static_hits(reads, profile_rows, [len(profile_rows)])[0]
        / n,
        "static_oracle": [h / n for h in static_hits(reads, own_rows, sizes)],
        "lru": [lru_hits(reads, k) / n for k in sizes],
        "refreshed_lfu": [h / n for h in refreshed_lfu_hits(reads, sizes, refresh, args.decay)],
        "profile_refreshed_lfu": [
            h / n for h in refreshed_lfu_hits(reads, sizes, refresh, args.decay, seed=train)
        ],
        "seen_before": seen_before_hits(reads) / n,
    }
    out["seconds"] = time.perf_counter() - t0
    return out


def meets_target(layer: dict, policy: str) -> bool:
    frac, share = TARGET
    return any(f <= frac and h >= share for f, h in zip(layer["fractions"], layer[policy]))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = res["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4.2), squeeze=False)
    styles = {
        "static_profile": ("static (training profile)", "-o"),
        "static_oracle": ("static, held-out's own top rows (ceiling)", ":"),
        "lru": ("LRU", "-s"),
        "refreshed_lfu": ("decayed counts, refreshed", "-^"),
        "profile_refreshed_lfu": ("profile + decayed counts, refreshed", "-v"),
    }
    for ax, layer in zip(axes[0], layers):
        xs = [100 * f for f in layer["fractions"]]
        for key, (label, style) in styles.items():
            ax.plot(xs, [100 * h for h in layer[key]], style, label=label, ms=4)
        ax.axhline(100 * layer["seen_before"], color="grey", lw=0.8, ls="--")
        ax.axhline(50, color="red", lw=0.6)
        ax.axvline(5, color="red", lw=0.6)
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel("cache size (% of the layer's rows)")
        ax.set_ylabel("reads hit (%)")
        ax.set_title(f"{layer['layer']} ({layer['table_rows']:,} rows)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Engram row cache hit rate, held-out stdlib text ({res['read_tokens']:,} tokens; "
        f"profile: {res['profile_tokens']:,} training tokens). Grey: row read before.",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    ap.add_argument("--max-train-files", type=int, default=None, help="a smaller profile")
    ap.add_argument("--max-val-files", type=int, default=None, help="a shorter read stream")
    ap.add_argument("--refresh-tokens", type=int, default=512)
    ap.add_argument("--decay", type=float, default=0.9, help="count decay per refresh")
    ap.add_argument("--no-v41", action="store_true", help="skip the V4.1-sized layer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_dir = Path(args.model) if args.model else default_model_dir()
    config = ModelConfig.load(model_dir)
    tok = EngramTokenizer.from_file(model_dir / TOKENIZER_FILE)
    show = sys.stderr.isatty()
    train, _ = corpus_ids(tok, "train", max_files=args.max_train_files, progress=show)
    val, _ = corpus_ids(tok, "val", max_files=args.max_val_files, progress=show)
    train_c, val_c = tok.compress(train), tok.compress(val)
    hashers = [("built-in", hasher_for(config, tok))]
    if not args.no_v41:
        hashers.append(("V4.1-sized", v41_hasher(config, tok)))
    layers = []
    for name, hasher in hashers:
        profiles = count_rows(hasher, train_c)
        reads = stream_rows(hasher, val_c)
        for lid in hasher.layer_ids:
            label = f"{name} layer {lid}" if name == "built-in" else name
            print(f"measuring {label} ...", file=sys.stderr)
            layers.append(
                measure_layer(
                    label,
                    hasher.table_rows(lid),
                    profiles[lid],
                    reads[lid],
                    args,
                    hasher.heads_per_layer,
                )
            )
    res = {
        "what": "Engram row cache hit rate vs cache size on held-out stdlib text",
        "command": "python -m bench.hitrate "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "profile_tokens": int(len(train)),
        "read_tokens": int(len(val)),
        "refresh_tokens": args.refresh_tokens,
        "decay": args.decay,
        "target": {"max_cache_fraction": TARGET[0], "min_hit_rate": TARGET[1]},
        "git": git_commit(),
        "layers": layers,
    }
    res["target_met"] = {
        layer["layer"]: {p: meets_target(layer, p) for p in POLICIES} for layer in layers
    }
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{date}-cpu-hit-rate"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hit_rate.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "hit_rate.png")
    for layer in layers:
        print(layer["layer"], f"{layer['table_rows']:,} rows")
        for key in ("static_oracle", *POLICIES):
            cells = "  ".join(f"{100 * f:g}%:{100 * h:.1f}" for f, h in zip(FRACTIONS, layer[key]))
            print(f"  {key:15s} {cells}")
        print(f"  seen before {100 * layer['seen_before']:.1f}%")
    print(f"wrote {out}/hit_rate.json, hit_rate.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
