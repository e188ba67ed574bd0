"""What one adaptive hot-cache refresh costs against the rows the cache holds:
``python -m bench.refresh_cost``.

A cache of ``held`` rows (a float32 table of 2 x held rows of 4 values; the copies are tiny,
so the figure is the bookkeeping) refreshed ``--refreshes`` times, each after a window of
``--window`` hits on held rows and as many misses of other rows, at most ``--replace`` rows
replaced. Median and max µs per refresh per size; where the mapping compacts (its delta
merged into the base: the amortized O(held) step, hot_mapping.py) that step is timed apart.
Writes ``refresh.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .hotcache import timed_refreshes
from .provenance import environment
from .stats import summarize


def cost(held: int, window: int, replace: int, refreshes: int) -> dict:
    cache, us = timed_refreshes(held, window, replace, refreshes)
    out = {"held_rows": held, "us_per_refresh": summarize(us), "replaced": cache.stats.replaced}
    m = cache.mapping
    if hasattr(m, "items"):  # the compaction step, timed on its own
        t0 = time.perf_counter()
        type(m).of(*m.items(), m.version)
        out["compaction_us"] = 1e6 * (time.perf_counter() - t0)
        out["compact_every_refreshes"] = cache.compact_at / max(replace, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.refresh_cost", description=__doc__)
    ap.add_argument("--held", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 3_800_000])
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--replace", type=int, default=256)
    ap.add_argument("--refreshes", type=int, default=30)
    ap.add_argument("--label", default="", help="a name for this run in the JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [cost(h, args.window, args.replace, args.refreshes) for h in args.held]
    for r in rows:
        u = r["us_per_refresh"]
        print(f"{r['held_rows']:>9} rows held: {u['median']:9.0f} us median, {u['max']:9.0f} max")
    res = {
        "command": "python -m bench.refresh_cost "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "label": args.label,
        "environment": environment(torch.device("cpu")),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"refresh{('-' + args.label) if args.label else ''}.json").write_text(
        json.dumps(res, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
