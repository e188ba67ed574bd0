"""The file tier's plan per step, replayed: ``python -m bench.plan_replay``.

``--record FILE``: decode the built-in model over the file tier as ``engram-bench --tiers``'s
``file + DRAM`` row does (DRAM cache a quarter of the tables, warmed from the training profile,
prompts of held-out text and random ids) and keep every step's row ids per layer (safetensors).
``--replay FILE``: rebuild that tier (same budget, same warm start) and feed it the recorded
steps as the overlapped loop does (plan step N+1, then release step N), timing each plan
(``FileTier.translate``: rows -> DRAM slots, misses admitted and announced) by the thread's CPU
and wall clock, the reads (which the gathers run) apart; ``--profile`` adds cProfile's top
functions of the plans. Rounds alternate with ``--page-cache`` dropped or kept. Runs against
whichever ``offload`` package is first on the path, so two versions of it replay the same steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .stats import summarize


def _setup(quarter: bool = True):
    import torch

    from models.checkpoint import default_model_dir, table_files
    from offload.file_tier import open_file_tier
    from offload.offloaded_model import OffloadedModel
    from offload.profile import corpus_ids, hasher_for, profile
    from offload.store import Placement

    om = OffloadedModel.load(None, placement="cpu", gather="resident", progress=False)
    lids = om.model.config.engram_layer_ids
    ((path, keys),) = table_files(default_model_dir(), lids).items()
    budget = sum(t.nbytes for t in om.store.tables.values()) // 4
    ids, _ = corpus_ids(om.tokenizer, "train", max_files=60, progress=False)
    prof = profile(hasher_for(om.model.config, om.tokenizer), om.tokenizer.compress(ids))
    cpu = torch.device("cpu")

    def tier(io_kind: str = "auto"):
        store, t = open_file_tier(
            path, keys, budget, Placement.CPU, cpu, om.dtype.dtype, 8, file_io=io_kind
        )
        t.warm({lid: prof[lid].rows for lid in t.layers})
        return store, t

    return om, Path(path), tier


def record(out: Path, num_seqs: int, prompt_len: int, decode: int, seed: int) -> int:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from offload.accounting import Accountant
    from offload.file_gather import FileTierGather
    from offload.paths import make_prefetcher

    from .hotcache import prompt_sets

    om, _, make_tier = _setup()
    store, tier = make_tier()
    steps: list[dict[int, np.ndarray]] = []
    translate = tier.translate
    tier.translate = lambda row_ids: (
        steps.append({k: np.array(v, copy=True) for k, v in row_ids.items()}),
        translate(row_ids),
    )[1]
    pf = FileTierGather(make_prefetcher(store, "worker", "cpu", accountant=Accountant()), tier)
    args = argparse.Namespace(seed=seed, rounds=1, num_seqs=num_seqs, prompt_len=prompt_len)
    cfg = EngineConfig(max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * prompt_len)
    sp = SamplingParams(max_tokens=decode, temperature=0.0, ignore_eos=True)
    for prompts in prompt_sets(om, args)[1].values():
        engine = Engine(om.model, cfg, pf)
        for i, p in enumerate(prompts):
            engine.add(f"r{i}", p, sp)
        while engine.has_work:
            engine.step()
        pf.flush()
        engine.close()
    pf.close()  # and the tier
    store.close()
    tensors = {f"{i}.{lid}": ids for i, s in enumerate(steps) for lid, ids in s.items()}
    save_file(tensors, str(out))
    om.close()
    return len(steps)


def load_steps(path: Path) -> list[dict[int, np.ndarray]]:
    steps: dict[int, dict[int, np.ndarray]] = {}
    for key, ids in load_file(str(path)).items():
        i, lid = key.split(".")
        steps.setdefault(int(i), {})[int(lid)] = ids
    return [steps[i] for i in sorted(steps)]


def replay_once(tier, steps, decode_only: int, prof: cProfile.Profile | None) -> dict:
    """One pass over the steps; per decode step (at most ``decode_only`` tokens) the plan's
    thread CPU and wall, and the CPU of its reads (which the gathers would run)."""
    plan_cpu, plan_wall, read_cpu = [], [], []
    held = None
    for step in steps:
        c, w = time.thread_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        _, ticket = tier.translate(step)
        if prof is not None:
            prof.disable()
        c1, w1 = time.thread_time(), time.perf_counter()
        decode = max(v.shape[0] for v in step.values()) <= decode_only
        if decode:
            plan_cpu.append(c1 - c)
            plan_wall.append(w1 - w)
        ticket.settle()  # the reads the gathers would run
        if decode:
            read_cpu.append(time.thread_time() - c1)
        if held is not None:
            tier.release(held)
        held = ticket
    if held is not None:
        tier.release(held)
    ms = lambda v: 1e3 * float(np.mean(v)) if v else 0.0
    return {"plan_cpu_ms": ms(plan_cpu), "plan_wall_ms": ms(plan_wall), "read_cpu_ms": ms(read_cpu),
            "decode_steps": len(plan_cpu)}  # fmt: skip


def replay(path: Path, rounds: int, decode_only: int, profile_top: int, io_kind: str) -> dict:
    from .file_tier import drop

    steps = load_steps(path)
    om, file, make_tier = _setup()
    prof = cProfile.Profile() if profile_top else None
    runs: dict[str, list[dict]] = {"dropped": [], "kept": []}
    for r in range(rounds):
        for pc in ("dropped", "kept") if r % 2 == 0 else ("kept", "dropped"):
            store, tier = make_tier(io_kind)
            if pc == "dropped":
                drop(file)
            try:
                runs[pc].append(replay_once(tier, steps, decode_only, prof if r else None))
            finally:
                tier.close()
                store.close()  # the round's DRAM cache tables
    om.close()
    keys = ("plan_cpu_ms", "plan_wall_ms", "read_cpu_ms")
    out = {pc: {k: summarize([x[k] for x in v]) for k in keys} for pc, v in runs.items()}
    out["decode_steps"] = runs["kept"][0]["decode_steps"]
    out["load_average"] = os.getloadavg()
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(profile_top)
        out["profile"] = s.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    prog = "python -m bench.plan_replay"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--record", type=Path, help="decode and write the steps' row ids here")
    ap.add_argument("--replay", type=Path, help="replay the steps recorded here")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--file-io", default="auto")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile's top N")
    args = ap.parse_args(argv)
    if args.record:
        n = record(args.record, args.num_seqs, args.prompt_len, args.decode_tokens, args.seed)
        print(f"recorded {n} steps in {args.record}")
    if args.replay:
        res = replay(args.replay, args.rounds, args.num_seqs, args.profile, args.file_io)
        for pc in ("dropped", "kept"):
            line = ", ".join(
                f"{k} {v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})" for k, v in res[pc].items()
            )
            print(f"page cache {pc}: {line} per decode step")
        print(f"decode steps {res['decode_steps']}, load {res['load_average']}")
        if "profile" in res:
            print(res["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
