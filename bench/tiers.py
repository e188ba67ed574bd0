"""``engram-bench --tiers``: decode over every tier combination of the memory hierarchy.

Rows, all serving the same checkpoint's tables to the same model: ``resident`` (rows gathered
in place on the compute device: the baseline), ``host`` (the tier's prefetch path over the
whole table in host memory: on a CPU the worker thread), ``host + hot`` (a hot-row cache of
``--hot-rows`` per layer in front of it), ``file + DRAM`` (rows stay in the checkpoint's file,
a DRAM cache of ``--host-memory-bytes``, by default a quarter of the tables, in front of it),
``file + DRAM + hot`` (the hot cache in front of that). Hot caches are ``static`` (a profile's
top rows: ``engram-profile``'s ranking over ``--profile-files`` training files) and
``adaptive`` (start empty, refreshed every ``--refresh`` steps). The file rows' DRAM caches
are warmed before serving from the same profile (``FileTier.warm``; behind a static hot set,
with the rows ranked after it). ``file + DRAM, sync reads`` reads a step's misses before its
plan returns, for the stall measured beside the issued reads in the same rounds; ablations of
``file + DRAM`` (``--file-io auto``: io_uring where the kernel allows it, the pages announced
with ``fadvise`` in the plan, a layer's reads one syscall in its gather): ``pread`` (``preadv``
per run instead), ``io_uring unannounced`` (no ``fadvise``), ``io_uring submitted by the
plan`` (the plan submits the reads, the gather reaps them); with
``pread``, ``announced by the first gather`` (the misses' pages announced to the kernel by the
step's first gather, beside layer 0's forward, rather than while the plan is built) and
``reads on threads`` (misses read on the tier's issuing threads, not lazily by the gather);
``cold start`` (no warm start), ``cold, hash directory, CLOCK bits`` (also the
hash directory and one reference bit, the tier's policy before). The file's pages are dropped
from the page cache before every file-tier job (``--keep-page-cache`` keeps them). The file
tier's share of each plan (rows -> slots, misses announced or issued) is timed per step.

Prompts: windows of the held-out corpus files (tokenized) and random ids, fresh each round,
the same for every row within it. Each job prefills ``--num-seqs`` prompts and decodes
``--decode-tokens`` greedily, overlapped steps as the server runs them. Every row is first
warmed up on a whole workload of its own (every prompt of both kinds, the full decode). A
round runs every other row in a pair with ``host``, back to back on the same prompts (rows
rotated, which of the two goes first alternating), so the load a pair meets is shared by both
its jobs; figures are medians with min-max over rounds: decode tokens/s and ms per decode
step, the penalty against ``host`` (median and min-max of the per-round ratios within the
pairs) and against ``resident`` (each round's pair ratios chained through ``host``), bytes
per token
over each link (hot cache -> compute, host tier or DRAM cache -> compute, file -> DRAM), the
hit rate of each cache, file read and stall ms per step; greedy tokens checked against
``resident``. Results: ``tiers.json`` and ``tiers.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from models.checkpoint import table_files
from offload.accounting import Accountant, StepStats
from offload.file_gather import FileTierGather
from offload.file_tier import open_file_tier
from offload.hot_cache import HotCache, parse_hot_rows
from offload.hot_rows import HotRows, file_tier_of, row_sources
from offload.offloaded_model import OffloadedModel
from offload.paths import make_prefetcher
from offload.profile import corpus_ids, hasher_for, profile
from offload.store import Placement

from .file_tier import drop
from .hotcache import prompt_sets
from .provenance import environment
from .stats import summarize

PROG = "engram-bench --tiers"
LINKS = ("hot_to_compute", "host_to_compute", "file_to_dram")
STALL = "stall_ms_per_step"
BASELINES = ("resident", "host")  # every penalty is against these: they always run
ROW_NAMES = (
    *BASELINES, "host + hot static", "host + hot adaptive", "file + DRAM, sync reads",
    "file + DRAM", "file + DRAM, pread", "file + DRAM, io_uring unannounced",
    "file + DRAM, io_uring submitted by the plan",
    "file + DRAM, announced by the first gather", "file + DRAM, reads on threads",
    "file + DRAM, cold start",
    "file + DRAM, cold, hash directory, CLOCK bits", "file + DRAM + hot static",
    "file + DRAM + hot adaptive",
)  # fmt: skip
FILE_MS = ("file_read_ms_per_step", "file_wait_ms_per_step", "file_plan_ms_per_step")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--host-memory-bytes", type=int, default=0, help="0: a quarter of the tables")
    ap.add_argument("--file-read-threads", type=int, default=8)
    ap.add_argument("--hot-rows", default="0.05", help="rows per layer: a count or a fraction")
    ap.add_argument("--profile-files", type=int, default=60, help="training files profiled, 0: all")
    ap.add_argument("--refresh", type=int, default=8, help="adaptive: steps between refreshes")
    ap.add_argument("--replace", type=int, default=256, help="adaptive: rows per refresh")
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-page-cache", action="store_true", help="do not drop the file's pages")
    ap.add_argument(
        "--row", action="append", default=None, metavar="NAME",
        help="run only this row (repeatable; resident and host always run: the baselines)",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="output dir (default bench/results/DATE-cpu-tiers)")
    args = ap.parse_args(argv)
    if args.row and (unknown := sorted(set(args.row) - set(ROW_NAMES))):
        ap.error(f"unknown --row {unknown}; rows: {', '.join(ROW_NAMES)}")
    return args


@dataclass
class Tally:
    """Sums of the steps an accountant books (subscribed once per row)."""

    steps: int = 0
    tokens: int = 0
    rows: int = 0
    hits: int = 0
    hit_bytes: int = 0
    bytes: int = 0
    file_hits: int = 0
    file_misses: int = 0
    file_bytes: int = 0
    file_read_s: float = 0.0
    file_wait_s: float = 0.0
    stall_s: float = 0.0
    translate_s: float = 0.0  # the file tier's share of planning (rows -> DRAM slots, reads issued)

    def add(self, st: StepStats) -> None:
        self.steps += 1
        self.tokens += st.num_tokens
        for s in st.layers.values():
            self.rows += s.rows
            self.hits += s.hits
            self.hit_bytes += s.hit_bytes
            self.bytes += s.bytes
            self.file_hits += s.file_hits
            self.file_misses += s.file_misses
            self.file_bytes += s.file_bytes
            self.file_read_s += s.file_read_s
            self.file_wait_s += s.file_wait_s
            self.stall_s += s.stall_s

    def copy(self) -> Tally:
        return Tally(**vars(self))

    def since(self, before: Tally) -> dict:
        d = {k: v - getattr(before, k) for k, v in vars(self).items()}
        tok, steps = max(d["tokens"], 1), max(d["steps"], 1)
        seen = d["file_hits"] + d["file_misses"]
        return {
            "bytes_per_token": {
                "hot_to_compute": d["hit_bytes"] / tok,
                "host_to_compute": d["bytes"] / tok,
                "file_to_dram": d["file_bytes"] / tok,
            },
            "hot_hit_rate": d["hits"] / d["rows"] if d["rows"] else None,
            "dram_hit_rate": d["file_hits"] / seen if seen else None,
            "file_read_ms_per_step": 1e3 * d["file_read_s"] / steps,
            "file_wait_ms_per_step": 1e3 * d["file_wait_s"] / steps,
            "stall_ms_per_step": 1e3 * d["stall_s"] / steps,
            "file_plan_ms_per_step": 1e3 * d["translate_s"] / steps,
        }


@dataclass
class Row:
    name: str
    rows: object  # the prefetcher the engine reads rows through
    tally: Tally
    file: Path | None = None  # the tables' file (file tier rows)


def build_rows(om: OffloadedModel, model_dir: Path, args) -> tuple[list[Row], dict]:
    lids = om.model.config.engram_layer_ids
    ((path, keys),) = table_files(model_dir, lids).items()
    table_bytes = sum(t.nbytes for t in om.store.tables.values())
    budget = args.host_memory_bytes or table_bytes // 4
    ids, _ = corpus_ids(om.tokenizer, "train", max_files=args.profile_files, progress=False)
    prof = profile(hasher_for(om.model.config, om.tokenizer), om.tokenizer.compress(ids))
    cpu = torch.device("cpu")
    out: list[Row] = []
    wanted = lambda name: not args.row or name in BASELINES or name in args.row

    def add(name: str, make, file: Path | None = None) -> None:
        assert name in ROW_NAMES, name  # --row's choices list every row
        if not wanted(name):
            return
        pf = make()
        tally = Tally()
        pf.accountant.subscribe(tally.add)
        tier = file_tier_of(pf)
        if tier is not None:  # time the tier's translation inside each plan
            translate = tier.translate

            def timed(row_ids, translate=translate, tally=tally):
                t = time.perf_counter()
                try:
                    return translate(row_ids)
                finally:
                    tally.translate_s += time.perf_counter() - t

            tier.translate = timed
        out.append(Row(name, pf, tally, file))

    def hot(pf, policy: str) -> HotRows:
        caches = {}
        for lid, src in row_sources(pf).items():
            n = parse_hot_rows(args.hot_rows, src.rows)
            first = prof[lid].rows[:n] if policy == "static" else None
            caches[lid] = HotCache(
                pf.store[lid], n, cpu, first, policy == "adaptive", args.refresh, args.replace,
                source=src,
            )  # fmt: skip
        return HotRows(pf, caches)

    def host():
        return make_prefetcher(om.store, "worker", cpu, accountant=Accountant())

    def file(async_reads=True, warm=True, skip_hot=False, main=False, lazy=True, in_plan=True,
             io="auto", submit=False, advise=True):  # fmt: skip
        cache, tier = open_file_tier(
            path, keys, budget, Placement.CPU, cpu, om.dtype.dtype, args.file_read_threads,
            directory="hash" if main else "auto", file_io=io,
        )  # fmt: skip
        tier.async_reads, tier.lazy_reads, tier.announce_in_plan = async_reads, lazy, in_plan
        tier.submit_in_plan = submit
        for fl in tier.layers.values():
            fl.reader.advise = advise
        for fl in tier.layers.values():
            fl.cache.max_ref = 1 if main else fl.cache.max_ref
        if warm and not main:  # a static hot set holds the top rows: the DRAM cache the next
            skip = {lid: parse_hot_rows(args.hot_rows, fl.rows) if skip_hot else 0
                    for lid, fl in tier.layers.items()}  # fmt: skip
            tier.warm({lid: prof[lid].rows[skip[lid] :] for lid in tier.layers})
        tier.check_capacity(args.num_seqs * args.prompt_len * om.model.config.engram_total_heads)
        return FileTierGather(make_prefetcher(cache, "worker", cpu, accountant=Accountant()), tier)

    add("resident", lambda: make_prefetcher(om.store, "resident", cpu, accountant=Accountant()))
    add("host", host)
    add("host + hot static", lambda: hot(host(), "static"))
    add("host + hot adaptive", lambda: hot(host(), "adaptive"))
    add("file + DRAM, sync reads", lambda: file(async_reads=False), path)
    add("file + DRAM", file, path)
    add("file + DRAM, pread", lambda: file(io="pread"), path)
    add("file + DRAM, io_uring unannounced", lambda: file(io="uring", advise=False), path)
    add(
        "file + DRAM, io_uring submitted by the plan",
        lambda: file(io="uring", submit=True, advise=False), path,
    )  # fmt: skip
    add("file + DRAM, announced by the first gather", lambda: file(in_plan=False, io="pread"), path)
    add("file + DRAM, reads on threads", lambda: file(lazy=False, io="pread"), path)
    add("file + DRAM, cold start", lambda: file(warm=False), path)
    add("file + DRAM, cold, hash directory, CLOCK bits", lambda: file(main=True), path)
    add("file + DRAM + hot static", lambda: hot(file(skip_hot=True), "static"), path)
    add("file + DRAM + hot adaptive", lambda: hot(file(), "adaptive"), path)
    hot_rows = {lid: parse_hot_rows(args.hot_rows, t.rows) for lid, t in om.store.tables.items()}
    info = {
        "table_bytes": table_bytes,
        "host_memory_bytes": budget,
        "table_over_budget": table_bytes / budget,
        "hot_rows_per_layer": hot_rows,
        "profile_tokens": int(ids.size),
    }
    return out, info


def run_job(om: OffloadedModel, row: Row, prompts: list[list[int]], args) -> dict:
    if row.file is not None and not args.keep_page_cache:
        drop(row.file)
    before = row.tally.copy()
    cfg = EngineConfig(
        max_num_seqs=args.num_seqs, max_num_batched_tokens=args.num_seqs * args.prompt_len
    )
    engine = Engine(om.model, cfg, row.rows)
    sp = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    seqs = [engine.add(f"r{i}", p, sp)[0] for i, p in enumerate(prompts)]
    calls, mark = 0, None  # decode: from the step after every prompt has its first token
    while engine.has_work:
        engine.step()
        calls += 1
        if mark is None and all(s.output_ids for s in seqs):
            mark = (time.perf_counter(), calls, sum(len(s.output_ids) for s in seqs))
    end = time.perf_counter()
    row.rows.flush()
    engine.close()
    t1, c1, n1 = mark
    made = sum(len(s.output_ids) for s in seqs) - n1
    return {
        "decode_tok_s": made / (end - t1),
        "step_ms": 1e3 * (end - t1) / max(calls - c1, 1),
        **row.tally.since(before),
        "tokens": [s.output_ids for s in seqs],
    }


def ratio_summary(values: list[float], base: list[float]) -> dict:
    """Per-round penalty in % (positive: slower than the base's throughput that round)."""
    return summarize([100.0 * (b / v - 1.0) for v, b in zip(values, base)])


def verdict(pen: dict, limit: float = 10.0) -> str:
    if pen["max"] <= limit:
        return f"within {limit:g}% in every round"
    if pen["min"] > limit:
        return f"over {limit:g}% in every round"
    if pen["median"] <= limit:
        return f"median within {limit:g}%, rounds spread past it (noise)"
    return f"median over {limit:g}%, rounds spread below it (noise)"


def pairs(rows: list[Row], r: int) -> list[tuple[Row, Row]]:
    """Round ``r``'s jobs: every row but ``host`` beside a ``host`` job, rows rotated by the
    round, ``host`` first in every other pair (the first and second of a pair alternate over
    the rounds, so neither side always meets a job's after-effects)."""
    host = next(row for row in rows if row.name == "host")
    others = [row for row in rows if row is not host]
    others = others[r % len(others) :] + others[: r % len(others)]
    return [(host, x) if (r + i) % 2 == 0 else (x, host) for i, x in enumerate(others)]


def tabulate(raw: dict, paired: dict, names: list[str]) -> dict:
    """``raw[kind][row]``: the row's jobs (one a round; ``host``: every pair's), ``paired``:
    the ``host`` job that ran beside each (``host``'s own: themselves)."""
    table = {}
    for kind, rows in raw.items():
        table[kind] = {}
        tok_of = lambda jobs: [j["decode_tok_s"] for j in jobs]
        resident = {j["round"]: j for j in rows["resident"]}
        # resident over its host in each round: the base the other rows' pair ratios meet
        res_ratio = [
            r / h for r, h in zip(tok_of(rows["resident"]), tok_of(paired[kind]["resident"]))
        ]
        for name in names:
            jobs = rows[name]
            tok, host = tok_of(jobs), tok_of(paired[kind][name])
            rel = [1.0] * len(res_ratio) if name == "host" else [t / h for t, h in zip(tok, host)]
            entry = {
                "decode_tok_s": summarize(tok),
                "step_ms": summarize([j["step_ms"] for j in jobs]),
                "penalty_vs_resident_pct": ratio_summary(rel, res_ratio),
                "penalty_vs_host_pct": ratio_summary(tok, host),
                "bytes_per_token": {
                    k: float(np.median([j["bytes_per_token"][k] for j in jobs])) for k in LINKS
                },
                "tokens_equal_resident": all(
                    j["tokens"] == resident[j["round"]]["tokens"] for j in jobs
                ),
            }
            for k in ("hot_hit_rate", "dram_hit_rate", *FILE_MS, STALL):
                vals = [j[k] for j in jobs if j[k] is not None]
                entry[k] = summarize(vals) if vals else None
            if name.startswith("file"):
                entry["verdict_vs_host_10pct"] = verdict(entry["penalty_vs_host_pct"])
            table[kind][name] = entry
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["rows"])
    names = list(result["rows"][kinds[0]])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    y = np.arange(len(names))
    for k, kind in enumerate(kinds):
        rows = result["rows"][kind]
        med = np.array([rows[n]["decode_tok_s"]["median"] for n in names])
        lo = med - np.array([rows[n]["decode_tok_s"]["min"] for n in names])
        hi = np.array([rows[n]["decode_tok_s"]["max"] for n in names]) - med
        axes[0].barh(y + 0.4 * k, med, 0.4, xerr=[lo, hi], label=kind, capsize=2)
    axes[0].set_yticks(y + 0.2, names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("decode tokens/s (median, min-max over rounds)")
    axes[0].legend(fontsize=8)
    rows = result["rows"][kinds[0]]
    left = np.zeros(len(names))
    for link in LINKS:
        v = np.array([rows[n]["bytes_per_token"][link] for n in names])
        axes[1].barh(y, v, left=left, label=link.replace("_", " "))
        left += v
    axes[1].set_yticks(y, names)
    axes[1].invert_yaxis()
    axes[1].set_xlabel(f"Engram bytes per token over each link ({kinds[0]})")
    axes[1].legend(fontsize=8)
    s = result["setup"]
    fig.suptitle(
        f"tier combinations, {result['environment']['device']}; tables "
        f"{s['table_over_budget']:.1f}x --host-memory-bytes",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    load_start = os.getloadavg()
    om = OffloadedModel.load(args.model, placement="cpu", gather="resident", progress=False)
    from models.checkpoint import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    rows, setup = build_rows(om, model_dir, args)
    sets = prompt_sets(om, args)
    warm, sets = sets[0], sets[1:]
    for row in rows:  # warm every path up (caches keep what they learn, as a server's would)
        for kind in warm:
            run_job(om, row, warm[kind], args)
    names = [r.name for r in rows]
    raw = {k: {n: [] for n in names} for k in warm}
    paired = {k: {n: [] for n in names} for k in warm}  # the host job beside each
    for r in range(args.rounds):
        for kind in warm:
            for first, second in pairs(rows, r):
                a, b = (run_job(om, x, sets[r][kind], args) | {"round": r} for x in (first, second))
                (job, host), row = ((a, b), first) if second.name == "host" else ((b, a), second)
                raw[kind][row.name].append(job)
                paired[kind][row.name].append(host)
                raw[kind]["host"].append(host)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for kind in raw:  # host's own pair: each of its jobs against itself
        paired[kind]["host"] = raw[kind]["host"]
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else Path("bench/results") / f"{date}-cpu-tiers"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": shlex.join(["engram-bench", "--tiers", *argv]),
        "date": date,
        "environment": environment(om.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "setup": setup | {"page_cache": "kept" if args.keep_page_cache else "dropped per job"},
        "load_average": {"start": load_start[0], "end": os.getloadavg()[0]},
        "rows": tabulate(raw, paired, names),
    }
    (out / "tiers.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "tiers.png")
    print(markdown(result))
    print(f"wrote {out / 'tiers.json'}")
    for row in rows:
        row.rows.close()
    om.close()
    return 0


def markdown(result: dict) -> str:
    """The README's table, from the JSON."""
    lines = []
    for kind, rows in result["rows"].items():
        lines += [
            f"Prompts: {kind}",
            "",
            "| row | decode tok/s | ms/step | penalty vs resident | penalty vs host | "
            "B/token hot / host / file | hot hit | DRAM hit | file read / wait / plan ms/step | "
            "same tokens |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in rows.items():
            t, s = v["decode_tok_s"], v["step_ms"]
            pr, ph = v["penalty_vs_resident_pct"], v["penalty_vs_host_pct"]
            b = v["bytes_per_token"]
            pct = lambda x: "-" if x is None else f"{x['median']:.1%}"
            fr, fw = v["file_read_ms_per_step"], v["file_wait_ms_per_step"]
            fp = v.get("file_plan_ms_per_step")
            fp = f" / {fp['median']:.2f}" if fp else ""
            fr = f"{fr['median']:.2f} / {fw['median']:.2f}{fp}" if name.startswith("file") else "-"
            lines.append(
                f"| {name} | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
                f"{s['median']:.1f} | {pr['median']:+.1f}% ({pr['min']:+.0f}..{pr['max']:+.0f}) | "
                f"{ph['median']:+.1f}% ({ph['min']:+.0f}..{ph['max']:+.0f}) | "
                f"{b['hot_to_compute']:.0f} / {b['host_to_compute']:.0f} / "
                f"{b['file_to_dram']:.0f} | {pct(v['hot_hit_rate'])} | {pct(v['dram_hit_rate'])} | "
                f"{fr} | "
                f"{'yes' if v['tokens_equal_resident'] else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
