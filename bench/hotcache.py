"""``engram-bench --hot-cache``: decode with and without a hot-row cache, real text and random ids.

Rows (paths), all over one table store: ``resident`` (rows gathered in place, the baseline),
``host`` (the tier's prefetch path: the worker thread on a CPU), ``host + hot static`` (a
cache of ``--hot-rows`` per layer holding the profile's top rows: ``engram-profile``'s ranking
over ``--profile-files`` files of the training split), ``host + hot adaptive`` (an empty cache
filled while serving: refreshed every ``--refresh`` steps, at most ``--replace`` rows each).

Prompts: ``text`` draws ``--num-seqs`` windows of ``--prompt-len`` tokens from the held-out
corpus files (tokenized), ``random`` draws uniform token ids (no Zipf structure); fresh ones
each round, the same for every row in it. Each job prefills its prompts and decodes
``--decode-tokens`` greedily. Rounds are interleaved (every round runs every row on every
prompt set, in a rotated order); figures are medians over the rounds with min-max: generated
tokens per second, the penalty against ``resident``, the hot cache's hit rate, and the µs one
adaptive refresh took (in the run, and for caches of 10k, 100k and 1M rows). Results:
``hotcache.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from offload.accounting import Accountant
from offload.hot_cache import HotCache, parse_hot_rows
from offload.hot_rows import HotRows
from offload.offloaded_model import OffloadedModel
from offload.paths import make_prefetcher
from offload.profile import corpus_ids, hasher_for, profile
from offload.store import TableStore

from .provenance import environment
from .stats import summarize

PROG = "engram-bench --hot-cache"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--hot-rows", default="0.05", help="rows per layer: a count or a fraction")
    ap.add_argument("--profile-files", type=int, default=60, help="training files profiled")
    ap.add_argument("--refresh", type=int, default=8, help="adaptive: steps between refreshes")
    ap.add_argument("--replace", type=int, default=256, help="adaptive: rows per refresh")
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=None, help="output dir (default bench/results/DATE-cpu-hot-cache)"
    )
    return ap.parse_args(argv)


def prompt_sets(om: OffloadedModel, args) -> list[dict[str, list[list[int]]]]:
    """Per round (and one for the warm-up) fresh prompts: windows of the held-out text and
    random ids, the same for every row within a round (an adaptive cache never sees a prompt
    twice)."""
    rng = np.random.default_rng(args.seed)
    held_out, _ = corpus_ids(om.tokenizer, "val", progress=False)
    vocab = om.model.config.vocab_size
    out = []
    for _ in range(args.rounds + 1):
        starts = rng.integers(0, held_out.size - args.prompt_len, args.num_seqs)
        text = [held_out[s : s + args.prompt_len].tolist() for s in starts]
        rand = rng.integers(0, vocab, (args.num_seqs, args.prompt_len)).tolist()
        out.append({"text": text, "random": rand})
    return out


def build_rows(om: OffloadedModel, args) -> tuple[dict, dict]:
    """The rows' prefetchers over the shared store, and the static hot sets used."""
    ids, _ = corpus_ids(om.tokenizer, "train", max_files=args.profile_files, progress=False)
    prof = profile(hasher_for(om.model.config, om.tokenizer), om.tokenizer.compress(ids))
    store = om.store
    new = lambda gather: make_prefetcher(store, gather, "cpu", accountant=Accountant())

    def hot(policy: str) -> HotRows:
        caches = {}
        for lid, t in store.tables.items():
            n = parse_hot_rows(args.hot_rows, t.rows)
            first = prof[lid].rows[:n] if policy == "static" else None
            caches[lid] = HotCache(
                t, n, "cpu", first, policy == "adaptive", args.refresh, args.replace
            )
        return HotRows(new("worker"), caches)

    rows = {
        "resident": new("resident"),
        "host": new("worker"),
        "host + hot static": hot("static"),
        "host + hot adaptive": hot("adaptive"),
    }
    sizes = {lid: parse_hot_rows(args.hot_rows, t.rows) for lid, t in store.tables.items()}
    return rows, {"profile_tokens": int(ids.size), "hot_rows_per_layer": sizes}


def run_job(om: OffloadedModel, rows, prompts: list[list[int]], args) -> dict:
    before = {lid: (s.rows, s.hits) for lid, s in rows.accountant.totals.layers.items()}
    cfg = EngineConfig(max_num_seqs=args.num_seqs, max_num_batched_tokens=4096)
    engine = Engine(om.model, cfg, rows)
    sp = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0)
    t0 = time.perf_counter()
    seqs = [engine.add(f"r{i}", p, sp)[0] for i, p in enumerate(prompts)]
    engine.run_until_done()
    wall = time.perf_counter() - t0
    engine.close()
    looked = hit = 0
    for lid, s in rows.accountant.totals.layers.items():
        r0, h0 = before.get(lid, (0, 0))
        looked, hit = looked + s.rows - r0, hit + s.hits - h0
    return {
        "tok_s": sum(len(s.output_ids) for s in seqs) / wall,
        "hit_rate": hit / looked if looked else 0.0,
        "tokens": [s.output_ids for s in seqs],
    }


def timed_refreshes(held: int, window: int, replace: int, repeats: int) -> tuple[HotCache, list]:
    """An adaptive cache holding ``held`` rows (a float32 table of 2 x held rows of 4 values)
    refreshed ``repeats`` times, each after a window of ``window`` hits and as many misses;
    the cache and the µs of each refresh."""
    store = TableStore.allocate({0: (2 * held, 4)}, torch.float32, "cpu", "cpu")
    cache = HotCache(store[0], held, "cpu", np.arange(held), True, max_replace=replace)
    rng = np.random.default_rng(0)
    us = []
    for _ in range(repeats):
        cache._hits.append(rng.integers(0, held, window))
        cache._misses.append(rng.integers(held, 2 * held, window))
        t0 = time.perf_counter()
        cache.refresh()
        us.append(1e6 * (time.perf_counter() - t0))
    return cache, us


def refresh_cost(held: int, window: int, replace: int, repeats: int = 7) -> dict:
    """µs per adaptive refresh (:func:`timed_refreshes`)."""
    _, us = timed_refreshes(held, window, replace, repeats)
    return {"held_rows": held, "window": window, "max_replace": replace, "us": summarize(us)}


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    om = OffloadedModel.load(args.model, placement="cpu", gather="resident", progress=False)
    rows, info = build_rows(om, args)
    rounds = prompt_sets(om, args)
    warm, rounds = rounds[0], rounds[1:]
    sets = list(warm)
    names = list(rows)
    for name in names:  # warm every path up (the adaptive caches keep what they learn)
        run_job(om, rows[name], warm["random"][:2], args)
    raw: dict[str, dict[str, dict[str, list]]] = {
        k: {n: {"tok_s": [], "hit_rate": []} for n in names} for k in sets
    }
    tokens: dict[str, dict[str, list]] = {k: {} for k in sets}
    for r in range(args.rounds):
        for k in sets:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                got = run_job(om, rows[name], rounds[r][k], args)
                raw[k][name]["tok_s"].append(got["tok_s"])
                raw[k][name]["hit_rate"].append(got["hit_rate"])
                tokens[k].setdefault(name, []).append(got["tokens"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    table = {}
    for k in sets:
        base = float(np.median(raw[k]["resident"]["tok_s"]))
        table[k] = {}
        for name in names:
            tok = summarize(raw[k][name]["tok_s"])
            table[k][name] = {
                "tok_s": tok,
                "penalty_vs_resident_pct": 100.0 * (base / tok["median"] - 1.0),
                "hit_rate": summarize(raw[k][name]["hit_rate"]),
                "tokens_equal_resident": tokens[k][name] == tokens[k]["resident"],
            }
    refresh = {}
    for lid, c in rows["host + hot adaptive"].caches.items():
        us = [1e6 * s for s in c.stats.seconds]
        refresh[lid] = {
            "refreshes": c.stats.refreshes,
            "replaced_per_refresh": c.stats.replaced / max(c.stats.refreshes, 1),
            "max_replace": c.max_replace,
            "us_per_refresh": summarize(us) | {"raw": None} if us else None,
        }
    window = args.refresh * args.num_seqs * om.model.config.engram_total_heads
    micro = [refresh_cost(h, max(window, 1), args.replace) for h in (10_000, 100_000, 1_000_000)]
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else Path("bench/results") / f"{date}-cpu-hot-cache"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": shlex.join(
            ["engram-bench", "--hot-cache", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": date,
        "environment": environment(om.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **info,
        "rows": table,
        "adaptive_refresh": refresh,
        "refresh_us_vs_held_rows": micro,
    }
    (out / "hotcache.json").write_text(json.dumps(result, indent=2) + "\n")
    for k in sets:
        print(f"prompts: {k}")
        for name, v in table[k].items():
            print(
                f"  {name:22s} {v['tok_s']['median']:8.1f} tok/s "
                f"({v['tok_s']['min']:.1f}-{v['tok_s']['max']:.1f})  "
                f"penalty {v['penalty_vs_resident_pct']:+6.1f}%  "
                f"hit rate {v['hit_rate']['median']:.1%}  same tokens {v['tokens_equal_resident']}"
            )
    for lid, v in refresh.items():
        us = v["us_per_refresh"]
        print(
            f"adaptive refresh layer {lid}: {v['refreshes']} refreshes, "
            f"{v['replaced_per_refresh']:.0f} rows each (max {v['max_replace']}), "
            f"{us['median']:.0f} us median, {us['max']:.0f} us max"
            if us
            else f"adaptive refresh layer {lid}: none"
        )
    for m in micro:
        print(
            f"refresh of a {m['held_rows']}-row cache ({m['window']} hits + misses counted, "
            f"<= {m['max_replace']} rows replaced): {m['us']['median']:.0f} us median"
        )
    print(f"wrote {out / 'hotcache.json'}")
    for p in rows.values():
        p.close()
    om.close()
    return 0
