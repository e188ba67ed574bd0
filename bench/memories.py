"""``engram-bench --memories``: many Engram memories on one backbone, mixed in a batch.

Memories are made from ``--model`` as fine-tunes would be (the backbone's bytes, every Engram
tensor redrawn: bench/memory_copies.py) and attached to it as ``engram-serve --memories``
does (engine/memories.py). Two measurements, on the engine itself (no HTTP):

- throughput: ``--num-seqs`` sequences prefill ``--prompt-len`` tokens and decode
  ``--decode-tokens`` greedily, all on the base memory ("one memory": the step as without
  memories), or spread round-robin over 1, 4 and 16 attached memories (every step mixed;
  one plan, one upload, the Engram module run per memory group). Rounds interleaved; medians
  with min-max of generated tokens per second, and the change against one memory.
- reload under load: ``--num-seqs`` sequences of one memory are kept running (a finished one
  is replaced at once) while that memory is reloaded from another checkpoint on a loader
  thread; the new version is installed between two steps. Latency of the requests that
  finished during the reload against those that finished before it, and step times.

Results: ``memories.json`` and ``memories.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.engine import Engine
from engine.memories import MemoryLoader
from engine.sampling import SamplingParams
from offload.offloaded_model import OffloadedModel

from .memory_copies import make_memory
from .provenance import environment
from .stats import summarize

PROG = "engram-bench --memories"
COUNTS = (1, 4, 16)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--num-seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reload-seconds", type=float, default=6.0, help="load window measured")
    ap.add_argument("--out", default=None, help="results directory")
    return ap.parse_args(argv)


def engine_for(om: OffloadedModel, args) -> Engine:
    cfg = EngineConfig(
        max_num_seqs=args.num_seqs,
        max_num_batched_tokens=args.num_seqs * args.prompt_len,
    )
    return Engine(om.model, cfg, om.prefetcher, om.tokenizer)


def run_job(engine: Engine, prompts: list[list[int]], names: list[str | None], args) -> dict:
    """Prefill and decode every prompt (prompt i on memory names[i % len(names)])."""
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    seqs = []
    for i, p in enumerate(prompts):
        seqs += engine.add(f"r{i}", p, params, names[i % len(names)])
    while any(s.num_computed < len(s.prompt_ids) for s in seqs):  # prefill, not timed
        engine.step()
    t0 = time.perf_counter()
    engine.run_until_done()
    dt_s = time.perf_counter() - t0
    generated = sum(len(s.output_ids) for s in seqs) - len(seqs)  # the first came in prefill
    return {"tok_s": generated / dt_s, "tokens": [s.output_ids for s in seqs]}


def throughput(engine: Engine, prompts_per_round: list, args) -> dict:
    jobs = {"one memory": [None], **{f"{k} mixed": [f"m{i}" for i in range(k)] for k in COUNTS}}
    names = list(jobs)
    for name in names:  # warm-up
        run_job(engine, prompts_per_round[0][:4], jobs[name], args)
    raw: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            raw[name].append(run_job(engine, prompts_per_round[r + 1], jobs[name], args)["tok_s"])
        print(f"throughput round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = float(np.median(raw["one memory"]))
    return {
        n: {
            "memories": len(jobs[n]) if jobs[n][0] else 0,
            "tok_s": summarize(raw[n]),
            "change_vs_one_memory_pct": 100.0 * (float(np.median(raw[n])) / base - 1.0),
        }
        for n in names
    }


def reload_under_load(engine: Engine, loader: MemoryLoader, new_dir: Path, prompts, args) -> dict:
    """Requests of m0 kept running while m0 reloads; latencies before and during the load."""
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(1)
    added: dict = {}  # sequence -> its arrival (perf_counter)
    done: list[tuple[float, float]] = []  # (arrived at, finished at)
    steps: list[tuple[float, float]] = []  # (ended at, step seconds)
    box: dict = {}

    def add() -> None:
        p = prompts[int(rng.integers(len(prompts)))]
        for s in engine.add(f"l{len(added)}", p, params, "m0"):
            added[s] = time.perf_counter()

    def load() -> None:
        box["t0"] = time.perf_counter()
        box["memory"] = loader.load("m0", new_dir)
        box["loaded"] = time.perf_counter()

    for _ in range(args.num_seqs):
        add()
    t_start = time.perf_counter()
    loader_thread = None
    while True:
        now = time.perf_counter()
        if loader_thread is None and now - t_start > args.reload_seconds / 3:
            loader_thread = threading.Thread(target=load)
            loader_thread.start()
        if "memory" in box and "installed" not in box:  # between two steps, as the server
            engine.memories.install(box["memory"])
            box["installed"] = time.perf_counter()
        t = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        steps.append((end, end - t))
        for s in [s for s in added if s.finished]:
            done.append((added.pop(s), end))
            engine.memories.collect()
            add()
        if "installed" in box and end - box["installed"] > args.reload_seconds / 3:
            break
    loader_thread.join()
    engine.abort(list(added))
    engine.run_until_done()
    engine.memories.collect(idle=True)
    t0, t1 = box["t0"], box["installed"]

    # a request is "during" the reload when it was running at any time from the load's
    # start to the new version's install; "before" ended before, "after" began after
    before = [b - a for a, b in done if b < t0]
    during = [b - a for a, b in done if a <= t1 and b >= t0]
    after = [b - a for a, b in done if a > t1]
    step_ms = lambda keep: [1e3 * v for at, v in steps if keep(at)]
    return {
        "load_seconds": box["loaded"] - t0,
        "install_seconds_after_load": t1 - box["loaded"],
        "requests_before": len(before),
        "requests_during": len(during),
        "requests_after": len(after),
        "latency_before_s": summarize(before) if before else None,
        "latency_during_s": summarize(during) if during else None,
        "latency_after_s": summarize(after) if after else None,
        "step_ms_before": summarize(step_ms(lambda at: at < t0)),
        "step_ms_during": summarize(step_ms(lambda at: t0 <= at <= t1 + 0.05)),
        "new_version": box["memory"].version,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["throughput"]
    names = list(rows)
    med = [rows[n]["tok_s"]["median"] for n in names]
    err = [
        [m - rows[n]["tok_s"]["min"] for n, m in zip(names, med)],
        [rows[n]["tok_s"]["max"] - m for n, m in zip(names, med)],
    ]
    a.bar(names, med, yerr=err, capsize=4)
    a.set_ylabel("generated tokens/s (median, min-max)")
    a.set_title(f"{result['settings']['num_seqs']} sequences per batch", fontsize=9)
    rl = result["reload"]
    labels = ["before reload", "during reload", "after reload"]
    vals = [rl["latency_before_s"], rl["latency_during_s"], rl["latency_after_s"]]
    b.bar(
        labels,
        [v["median"] if v else 0 for v in vals],
        yerr=[
            [v["median"] - v["min"] if v else 0 for v in vals],
            [v["max"] - v["median"] if v else 0 for v in vals],
        ],
        capsize=4,
    )
    b.set_ylabel("request latency s (median, min-max)")
    b.set_title(f"reload: load {rl['load_seconds']:.2f} s on a loader thread", fontsize=9)
    fig.suptitle(f"Engram memories on {result['environment']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    om = OffloadedModel.load(args.model, placement="cpu", progress=False)
    base_dir = Path(args.model) if args.model else None
    from models.checkpoint import default_model_dir

    base_dir = base_dir or default_model_dir()
    vocab = om.model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts_per_round = [
        [[int(t) for t in rng.integers(3, vocab, args.prompt_len)] for _ in range(args.num_seqs)]
        for _ in range(args.rounds + 1)
    ]
    with tempfile.TemporaryDirectory(prefix="engram-memories-") as tmp:
        dirs = [make_memory(base_dir, Path(tmp) / f"m{i}", seed=i + 1) for i in range(max(COUNTS))]
        reloaded = make_memory(base_dir, Path(tmp) / "reloaded", seed=100)
        loader = MemoryLoader(
            om, lambda d, loaded: OffloadedModel.load(d, "cpu", progress=False, loaded=loaded)
        )
        engine = engine_for(om, args)
        for i, d in enumerate(dirs):
            engine.memories.install(loader.load(f"m{i}", d))
        table = throughput(engine, prompts_per_round, args)
        reload = reload_under_load(engine, loader, reloaded, prompts_per_round[0], args)
        engine.close()
        for m in engine.memories.snapshot():
            if not m.base:
                m.close()
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else Path("bench/results") / f"{date}-cpu-memories"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": shlex.join(["engram-bench", "--memories", *argv]),
        "date": date,
        "environment": environment(om.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": str(base_dir.name),
        "throughput": table,
        "reload": reload,
    }
    (out / "memories.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "memories.png")
    for name, v in table.items():
        t = v["tok_s"]
        print(
            f"{name:12s} {t['median']:8.1f} tok/s ({t['min']:.1f}-{t['max']:.1f}, "
            f"+-{t['spread_pct'] or 0:.0f}%)  {v['change_vs_one_memory_pct']:+6.1f}% vs one memory"
        )
    lb, ld = reload["latency_before_s"], reload["latency_during_s"]
    print(
        f"reload: load {reload['load_seconds']:.2f} s off the step thread; request latency "
        f"before {lb['median']:.3f} s, during {ld['median'] if ld else float('nan'):.3f} s "
        f"({reload['requests_during']} requests)"
    )
    print(f"wrote {out / 'memories.json'}")
    om.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
