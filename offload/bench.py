"""``engram-bench``: the offload penalty report.

One process, one model, one workload, run once per table placement and gather path: the
resident baseline first, then every offloaded path. Every row gets the same weights, prompts
and seeds, decodes greedily, and must produce the same tokens as the baseline; a row that does
not fails the run, by name. Alongside tokens/s and the % penalty each row reports stall,
bytes moved and achieved GB/s against a link ceiling measured in the same run, plus memory.

Workloads:
- paper: N sequences, prompt lengths Uniform(MIN, MAX) (fixed seed, random ids), prefilled in
  chunks under a token budget, then M decode steps with all sequences together; prefill and
  decode are timed separately;
- sweep: steady decode at several batch sizes (short prompts, untimed prefill and warm-up).
A gather microbenchmark (CUDA: staged vs UVA vs device-resident; CPU: resident vs worker
thread) times rows per step against the same ceiling and reports the staged/UVA crossover.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.cache import KVCache
from models.checkpoint import ENGRAM_FILE, default_model_dir, load_checkpoint, table_key
from models.generate import RowSourceFactory, StepRunner
from models.llama import EngramForCausalLM

from .accounting import StepStats
from .engine import OffloadEngine
from .prefetch import valid_gathers
from .store import Placement, TableStore, cupy_ok
from .synthetic import (
    SHAPES,
    build_synthetic_model,
    engram_param_count,
    random_store,
    synthetic_config,
)

PROG = "engram-bench"
BLOCK_SIZE = 16


class BenchError(Exception):
    """Bad input or a failed check: one line for the user, non-zero exit."""


# --- what runs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSpec:
    placement: str
    gather: str
    dedup: bool = False

    @property
    def name(self) -> str:
        return f"{self.placement}/{self.gather}" + ("+dedup" if self.dedup else "")


@dataclass
class Workload:
    num_seqs: int
    prompt_len: tuple[int, int]
    decode_tokens: int
    max_batched_tokens: int
    batch_sizes: list[int]
    sweep_prompt_len: int
    sweep_steps: int
    sweep_warmup: int
    micro_rows: list[int]
    micro_repeats: int
    ceiling_bytes: int
    seed: int
    runs: int  # each timed phase keeps its fastest run


# (quick, cuda) -> num seqs, decode tokens, tokens/step budget, sweep batch sizes, sweep steps,
# microbenchmark rows (log2), ceiling copy size (MiB)
DEFAULTS = {
    (True, False): (8, 32, 512, [1, 4, 16], 16, (10, 12, 14, 16), 64),
    (False, False): (16, 64, 2048, [1, 8, 32, 64], 16, (10, 12, 14, 16, 18), 256),
    (True, True): (16, 32, 4096, [1, 8, 32], 16, (10, 14, 18), 256),
    (False, True): (128, 128, 8192, [1, 8, 32, 128, 512], 32, (10, 12, 14, 16, 18, 20), 1024),
}


# --- the model and its tables --------------------------------------------------------------
@dataclass
class ModelSource:
    """A model with unloaded (meta) tables, and a way to put its tables in any placement."""

    model: EngramForCausalLM
    description: str
    make_store: Callable[[str], TableStore]
    info: dict = field(default_factory=dict)
    _stores: dict[str, TableStore] = field(default_factory=dict)

    def store(self, placement: str) -> TableStore:
        if placement not in self._stores:
            self._stores[placement] = self.make_store(placement)
        return self._stores[placement]

    def drop(self, placement: str) -> None:
        if self._stores.pop(placement, None) is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def drop_all(self) -> None:
        for placement in list(self._stores):
            self.drop(placement)


def checkpoint_source(directory: Path, dtype: str, device: torch.device, progress: bool):
    model, _ = load_checkpoint(directory, dtype=dtype, device=device, load_tables=False)
    keys = {lid: table_key(lid) for lid in model.config.engram_layer_ids}

    def make(placement: str) -> TableStore:
        return TableStore.from_safetensors(
            directory / ENGRAM_FILE, keys, placement, device, progress=progress
        )

    return ModelSource(model, f"checkpoint {directory}", make, {"model_dir": str(directory)})


def synthetic_source(
    name: str, engram_params: float, layers: int | None, dtype: str, device, seed, progress
):
    config = synthetic_config(name, engram_params, layers)
    model = build_synthetic_model(config, device, getattr(torch, dtype), seed)

    def make(placement: str) -> TableStore:
        return random_store(model, placement, device, torch.bfloat16, seed, progress)

    return ModelSource(model, f"synthetic {name}", make, {"synthetic": name})


# --- measurement helpers -------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_ceiling(device: torch.device, nbytes: int, repeats: int = 5) -> dict:
    """The link's best case in this run: a large pinned H2D copy on CUDA (CUDA events), a
    large host memcpy on CPU (there is no link; this is the memory bandwidth stand-in)."""
    best = float("inf")
    if device.type == "cuda":
        src = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        label = "pinned host-to-device copy (CUDA events)"
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        for _ in range(repeats):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        label = "host memcpy (CPU, no PCIe link)"
    return {"label": label, "bytes": nbytes, "seconds": best, "gbps": nbytes / best / 1e9}


class StepLog:
    """Collects the engine's per-step figures under the current phase label."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.steps: dict[str, list[StepStats]] = {}

    def __call__(self, step: StepStats) -> None:
        if self.phase is not None:
            self.steps.setdefault(self.phase, []).append(step)

    def take(self, *phases: str) -> list[StepStats]:
        return [s for p in phases for s in self.steps.get(p, [])]


def step_figures(steps: list[StepStats], ceiling_gbps: float, timed_gather: bool) -> dict:
    """Per-step means over ``steps``: stall, bytes, rows, achieved GB/s (per layer and all)."""
    n = max(len(steps), 1)
    layers: dict[int, dict] = {}
    for lid in sorted({lid for s in steps for lid in s.layers}):
        ls = [s.layers[lid] for s in steps if lid in s.layers]
        nbytes, pre = sum(x.bytes for x in ls), sum(x.prefetch_s for x in ls)
        layers[lid] = {
            "tier": ls[0].tier,
            "stall_ms_per_step": 1e3 * sum(x.stall_s for x in ls) / n,
            "slack_ms_per_step": 1e3 * sum(x.slack_s for x in ls) / n,
            "prefetch_ms_per_step": 1e3 * pre / n,
            "rows_per_step": sum(x.rows for x in ls) / n,
            "unique_rows_per_step": sum(x.unique_rows for x in ls) / n,
            "bytes_per_step": nbytes / n,
            "gbps": nbytes / pre / 1e9 if timed_gather and pre > 0 else None,
        }
    nbytes = sum(s.bytes for s in steps)
    pre = sum(x.prefetch_s for s in steps for x in s.layers.values())
    step_s = sum(s.step_s for s in steps)
    gbps = nbytes / pre / 1e9 if timed_gather and pre > 0 else None
    return {
        "steps": len(steps),
        "stall_ms_per_step_per_layer": float(
            np.mean([x["stall_ms_per_step"] for x in layers.values()]) if layers else 0.0
        ),
        "bytes_per_step": nbytes / n,
        "gbps": gbps,
        "fraction_of_ceiling": gbps / ceiling_gbps if gbps is not None else None,
        "stall_fraction": sum(s.stall_s for s in steps) / step_s if step_s > 0 else 0.0,
        "layers": {str(k): v for k, v in layers.items()},
    }


# --- the step loop: chunked prefill under a token budget, then decode all together ---------
class Batch:
    def __init__(
        self,
        model: EngramForCausalLM,
        rows: RowSourceFactory,
        prompts: list[list[int]],
        decode_tokens: int,
        device: torch.device,
    ) -> None:
        self.prompts = prompts
        blocks = sum(-(-(len(p) + decode_tokens + 1) // BLOCK_SIZE) for p in prompts)
        dtype = model.model.embed_tokens.weight.dtype
        cache = KVCache(model.config, blocks, BLOCK_SIZE, len(prompts), dtype, device)
        self.runner = StepRunner(model, cache, rows)
        self.seqs = [self.runner.new_sequence() for _ in prompts]
        self.out: list[list[int]] = [[] for _ in prompts]

    def prefill(self, budget: int, progress: bool = False) -> int:
        """Prompts in order, chunked so a step never exceeds ``budget`` tokens; each finished
        prompt's last logits give its first token. Returns the number of steps."""
        done = [0] * len(self.prompts)
        queue = list(range(len(self.prompts)))
        steps = 0
        total = sum(len(p) for p in self.prompts)
        with tqdm(
            total=total, desc="prefill", unit="tok", leave=False, disable=not progress
        ) as bar:
            while queue:
                picked, chunks, left = [], [], budget
                for i in queue:
                    if left == 0:
                        break
                    n = min(left, len(self.prompts[i]) - done[i])
                    picked.append(i)
                    chunks.append(self.prompts[i][done[i] : done[i] + n])
                    left -= n
                logits = self.runner.step([self.seqs[i] for i in picked], chunks)
                finished = []
                for row, (i, c) in enumerate(zip(picked, chunks)):
                    done[i] += len(c)
                    if done[i] == len(self.prompts[i]):
                        finished.append((row, i))
                if finished:
                    toks = logits[[r for r, _ in finished]].argmax(-1).tolist()
                    for (_, i), t in zip(finished, toks):
                        self.out[i].append(t)
                queue = [i for i in queue if done[i] < len(self.prompts[i])]
                steps += 1
                bar.update(budget - left)
        return steps

    def decode(self, steps: int, progress: bool = False) -> None:
        for _ in tqdm(range(steps), desc="decode", leave=False, disable=not progress):
            logits = self.runner.step(self.seqs, [[o[-1]] for o in self.out])
            for o, t in zip(self.out, logits.argmax(-1).tolist()):
                o.append(t)


def make_prompts(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in lengths]


def tokens_digest(tokens: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


@dataclass
class Timed:
    tokens: list[list[int]]
    seconds: dict[str, float]  # phase -> best over runs
    steps: int = 0


def _timed_runs(runs: int, device: torch.device, log: StepLog, once) -> Timed:
    """Run ``once(clock)`` ``runs`` times; each phase keeps its fastest run. ``clock(phase)``
    syncs the device, books the steps that follow under ``phase`` and reads the time."""
    best: dict[str, float] = {}
    first: Timed | None = None
    marks: list[tuple[str | None, float]] = []

    def clock(phase: str | None) -> None:
        _sync(device)
        marks.append((phase, time.perf_counter()))
        log.phase = phase

    for _ in range(runs):
        marks.clear()
        result = once(clock)
        clock(None)
        for (phase, t), (_, t_next) in zip(marks, marks[1:]):
            if phase is not None:
                best[phase] = min(best.get(phase, float("inf")), t_next - t)
        if first is None:
            first = result
        elif result.tokens != first.tokens:
            raise BenchError("greedy tokens changed between two runs of the same row")
    first.seconds = best
    return first


def paper_prompts(wl: Workload, vocab: int) -> list[list[int]]:
    return make_prompts(np.random.default_rng(wl.seed), wl.num_seqs, *wl.prompt_len, vocab)


def run_paper(model, rows, wl: Workload, device, log: StepLog, progress: bool) -> Timed:
    prompts = paper_prompts(wl, model.config.vocab_size)

    def once(clock) -> Timed:
        batch = Batch(model, rows, prompts, wl.decode_tokens, device)
        clock("prefill")
        steps = batch.prefill(wl.max_batched_tokens, progress)
        clock("decode")
        batch.decode(wl.decode_tokens, progress)
        return Timed(batch.out, {}, steps)

    return _timed_runs(wl.runs, device, log, once)


def run_sweep_point(model, rows, wl: Workload, bs: int, device, log: StepLog, progress) -> Timed:
    rng = np.random.default_rng([wl.seed, bs])
    vocab = model.config.vocab_size
    prompts = make_prompts(rng, bs, wl.sweep_prompt_len, wl.sweep_prompt_len, vocab)

    def once(clock) -> Timed:
        batch = Batch(model, rows, prompts, wl.sweep_warmup + wl.sweep_steps, device)
        batch.prefill(wl.max_batched_tokens)
        batch.decode(wl.sweep_warmup)
        clock(f"sweep{bs}")
        batch.decode(wl.sweep_steps, progress)
        return Timed(batch.out, {})

    return _timed_runs(wl.runs, device, log, once)


def run_path(
    src: ModelSource,
    spec: PathSpec,
    wl: Workload,
    device: torch.device,
    ceiling_gbps: float,
    progress: bool,
) -> tuple[dict, dict[str, list[list[int]]]]:
    """One row of the report; returns its figures and its generated tokens per workload."""
    model = src.model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    store = src.store(spec.placement)
    engine = OffloadEngine.from_parts(model, None, store, spec.gather, device, spec.dedup)
    log = StepLog()
    engine.accountant.subscribe(log)
    # a host-clock timer around an async device gather measures the launch, not the copy
    timed_gather = not (device.type == "cuda" and spec.gather == "resident")
    figures = lambda *phases: step_figures(log.take(*phases), ceiling_gbps, timed_gather)
    try:
        warm_prompts = make_prompts(np.random.default_rng(1), 2, 8, 32, model.config.vocab_size)
        warm = Batch(model, engine.start_step, warm_prompts, 2, device)
        warm.prefill(wl.max_batched_tokens)
        warm.decode(2)
        del warm

        got = run_paper(model, engine.start_step, wl, device, log, progress)
        tokens = {"paper": got.tokens}
        t_pre, t_dec = got.seconds["prefill"], got.seconds["decode"]
        n_pre = sum(len(p) for p in paper_prompts(wl, model.config.vocab_size))
        n_dec = wl.num_seqs * wl.decode_tokens
        paper = {
            "prompt_tokens": n_pre,
            "decode_tokens": n_dec,
            "prefill_steps": got.steps,
            "prefill_s": t_pre,
            "decode_s": t_dec,
            "prefill_tok_s": n_pre / t_pre,
            "decode_tok_s": n_dec / t_dec if n_dec else None,
            "total_tok_s": (n_pre + n_dec) / (t_pre + t_dec),
            "all": figures("prefill", "decode"),
            "prefill": figures("prefill"),
            "decode": figures("decode"),
        }
        sweep = []
        for bs in wl.batch_sizes:
            got = run_sweep_point(model, engine.start_step, wl, bs, device, log, progress)
            tokens[f"sweep{bs}"] = got.tokens
            t = got.seconds[f"sweep{bs}"]
            point = {"batch_size": bs, "decode_s": t, "tok_s": bs * wl.sweep_steps / t}
            sweep.append(point | figures(f"sweep{bs}"))
        crossover = getattr(engine.prefetcher, "crossover", None)  # the 'auto' path's switch
    except BenchError as e:
        raise BenchError(f"row '{spec.name}': {e}") from None
    finally:
        engine.close()
    row = {
        "name": spec.name,
        "placement": spec.placement,
        "gather": spec.gather,
        "auto_crossover_rows": crossover,
        "dedup": spec.dedup,
        "paper": paper,
        "sweep": sweep,
        "memory": {
            "gpu_max_allocated_bytes": (
                torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            ),
            "host_rss_bytes": rss_bytes(),
            "table_bytes_by_tier": store.bytes_by_tier(),
        },
        "token_digest": {k: tokens_digest(v) for k, v in tokens.items()},
    }
    return row, tokens


def first_difference(ref: dict[str, list[list[int]]], got: dict[str, list[list[int]]]):
    for key, seqs in ref.items():
        other = got.get(key)
        if other is None or len(other) != len(seqs):
            return key, None, None
        for i, (a, b) in enumerate(zip(seqs, other)):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                return key, i, k
    return None


def add_penalties(rows: list[dict]) -> None:
    base = rows[0]

    def pen(value, ref):
        return 100.0 * (1.0 - value / ref) if value and ref else None

    for r in rows:
        p, bp = r["paper"], base["paper"]
        p["penalty_pct"] = {
            k: pen(p[f"{k}_tok_s"], bp[f"{k}_tok_s"]) for k in ("prefill", "decode", "total")
        }
        for s, bs in zip(r["sweep"], base["sweep"]):
            s["penalty_pct"] = pen(s["tok_s"], bs["tok_s"])


# --- microbenchmark ---------------------------------------------------------------------------
def micro_cpu(store: TableStore, rows_list: list[int], repeats: int, seed: int = 0) -> list[dict]:
    """CPU gather paths on the first table: index_select in place vs on a worker thread."""
    table = next(iter(store.tables.values()))
    rng = np.random.default_rng(seed)
    pool = ThreadPoolExecutor(1, thread_name_prefix="engram-bench")

    def best(fn) -> float:
        fn()
        out = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    out = []
    try:
        for n in rows_list:
            idx = torch.from_numpy(rng.integers(0, table.rows, n))
            gather = lambda idx=idx: torch.index_select(table.tensor, 0, idx)
            out.append(
                {
                    "rows": int(n),
                    "bytes": int(n * table.row_bytes),
                    "resident_s": best(gather),
                    "worker_s": best(lambda g=gather: pool.submit(g).result()),
                }
            )
    finally:
        pool.shutdown()
    return out


def run_micro(
    src: ModelSource, device: torch.device, wl: Workload, ceiling_gbps: float, placement: str
) -> dict:
    if device.type == "cuda":
        if placement != Placement.HOST.value:
            return {"skipped": "the CUDA gather microbenchmark needs --placement host"}
        from .autoselect import crossover_rows, measure_gathers

        store = src.store(placement)
        measured = measure_gathers(store, device, wl.micro_rows, wl.micro_repeats, resident=True)
        paths, crossover = ("staged", "uva", "resident"), crossover_rows(measured)
    else:
        measured = micro_cpu(src.store("cpu"), wl.micro_rows, wl.micro_repeats, wl.seed)
        paths, crossover = ("resident", "worker"), None
    for row in measured:
        for p in paths:
            gbps = row["bytes"] / row[f"{p}_s"] / 1e9
            row[f"{p}_gbps"] = gbps
            row[f"{p}_fraction_of_ceiling"] = gbps / ceiling_gbps
    return {"paths": list(paths), "rows": measured, "crossover_rows": crossover}


# --- environment, output ---------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def environment(device: torch.device) -> dict:
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "cupy": None,
        "cuda_driver": None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
        if device.type == "cuda":
            v = cupy.cuda.runtime.driverGetVersion()
            env["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
    except Exception:
        pass
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def report(res: dict) -> str:
    rows, wl, ceil = res["rows"], res["workload"], res["ceiling"]
    lo, hi = wl["prompt_len"]
    out = [
        f"{PROG}: {res['model']['description']} on {res['environment']['device']}",
        f"link ceiling: {ceil['gbps']:.2f} GB/s ({ceil['label']}, {fmt_bytes(ceil['bytes'])})",
        "",
        f"paper workload: {wl['num_seqs']} sequences, prompts Uniform({lo}, {hi}), "
        f"{wl['decode_tokens']} decode tokens each, {wl['max_batched_tokens']} tokens/step budget",
    ]
    body = []
    for r in rows:
        p, a = r["paper"], r["paper"]["all"]
        pen = p["penalty_pct"]
        body.append(
            [
                r["name"],
                fmt(p["prefill_tok_s"]),
                fmt(p["decode_tok_s"]),
                fmt(p["total_tok_s"]),
                "/".join(fmt(pen[k], "+.1f") for k in ("prefill", "decode", "total")),
                fmt(a["stall_ms_per_step_per_layer"], ".3f"),
                fmt_bytes(a["bytes_per_step"]),
                fmt(a["gbps"], ".2f"),
                fmt(None if a["fraction_of_ceiling"] is None else 100 * a["fraction_of_ceiling"]),
                "same" if r["tokens_match"] else "DIFFERENT",
            ]
        )
    out.append(
        table(
            [
                "path",
                "prefill tok/s",
                "decode tok/s",
                "total tok/s",
                "penalty % pre/dec/tot",
                "stall ms/step/layer",
                "bytes/step",
                "GB/s",
                "% ceiling",
                "tokens",
            ],
            body,
        )
    )
    if rows and rows[0]["sweep"]:
        out += ["", f"decode batch sweep: {wl['sweep_steps']} timed steps, tok/s (penalty %)"]
        heads = ["path"] + [f"B={s['batch_size']}" for s in rows[0]["sweep"]]
        body = [
            [r["name"]]
            + [f"{s['tok_s']:.1f} ({fmt(s['penalty_pct'], '+.1f')})" for s in r["sweep"]]
            for r in rows
        ]
        out.append(table(heads, body))
    out += ["", "memory"]
    body = []
    for r in rows:
        m = r["memory"]
        tiers = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m["table_bytes_by_tier"].items() if v)
        body.append(
            [
                r["name"],
                fmt_bytes(m["gpu_max_allocated_bytes"]),
                fmt_bytes(m["host_rss_bytes"]),
                tiers or "-",
            ]
        )
    out.append(table(["path", "GPU max allocated", "host RSS", "Engram tables"], body))
    micro = res.get("micro") or {}
    if micro.get("rows"):
        paths = micro["paths"]
        out += ["", "gather microbenchmark (first Engram table; latency ms, GB/s, % ceiling)"]
        body = [
            [str(m["rows"]), fmt_bytes(m["bytes"])]
            + [
                f"{1e3 * m[f'{p}_s']:.3f} / {m[f'{p}_gbps']:.2f} / "
                f"{100 * m[f'{p}_fraction_of_ceiling']:.0f}%"
                for p in paths
            ]
            for m in micro["rows"]
        ]
        out.append(table(["rows", "bytes", *paths], body))
        if res["environment"]["device_type"] == "cuda":
            c = micro["crossover_rows"]
            out.append(
                f"crossover: staged beats UVA from {c} rows per step"
                if c is not None
                else "crossover: UVA wins at every measured size"
            )
        else:
            out.append("crossover: n/a on CPU (staged/UVA and 'auto' are CUDA paths)")
    elif micro.get("skipped"):
        out += ["", f"gather microbenchmark skipped: {micro['skipped']}"]
    return "\n".join(out)


# --- CLI -------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"want positive integers, got {text!r}")
    return vals


def _range(text: str) -> tuple[int, int]:
    vals = _int_list(text)
    if len(vals) != 2 or vals[0] > vals[1]:
        raise argparse.ArgumentTypeError(f"want MIN,MAX with MIN <= MAX, got {text!r}")
    return vals[0], vals[1]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Offload penalty report: one workload, resident vs offloaded Engram tables.",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    src.add_argument("--synthetic", choices=sorted(SHAPES), help="random-weight model shape")
    ap.add_argument("--engram-params", type=float, default=20e9, help="synthetic: table params")
    ap.add_argument("--layers", type=int, default=None, help="synthetic: override layer count")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="backbone dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    ap.add_argument(
        "--placement",
        choices=[p.value for p in Placement],
        default=None,
        help="offloaded tier (default: host on CUDA, cpu otherwise)",
    )
    ap.add_argument(
        "--gathers",
        default=None,
        help="comma list of gather paths for that tier (default: all but 'resident')",
    )
    ap.add_argument("--dedup", choices=["off", "on", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="small workload, about a minute on CPU")
    ap.add_argument("--num-seqs", type=int, default=None)
    ap.add_argument("--prompt-len", type=_range, default=(100, 1024), metavar="MIN,MAX")
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--max-batched-tokens", type=int, default=None)
    ap.add_argument("--batch-sizes", type=_int_list, default=None, metavar="B1,B2,...")
    ap.add_argument("--sweep-steps", type=int, default=None)
    ap.add_argument("--sweep-prompt-len", type=int, default=16)
    ap.add_argument("--micro-rows", type=_int_list, default=None, metavar="N1,N2,...")
    ap.add_argument("--repeats", type=int, default=3, help="microbenchmark repeats")
    ap.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per workload, fastest kept (default 3; 1 on CUDA)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output dir (default bench/results/DATE-DEVICE)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 with --quick on CPU, else torch's)",
    )
    ap.add_argument("--no-plots", action="store_true")
    return ap


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda needs CUDA; torch sees no GPU here (use --device cpu)")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_paths(args, device: torch.device) -> list[PathSpec]:
    cuda = device.type == "cuda"
    if cuda and args.placement is None and not cupy_ok():
        raise BenchError(
            "offloading on CUDA uses pinned host memory, which needs CuPy: "
            "pip install 'engram-serve[gpu]' (or pass --placement gpu, or --device cpu)"
        )
    placement = args.placement or (Placement.HOST.value if cuda else Placement.CPU.value)
    if placement in (Placement.HOST.value, Placement.GPU.value) and not cuda:
        raise BenchError(
            f"--placement {placement} needs CUDA; this machine has none "
            f"(or --device cpu was given); use --placement cpu"
        )
    if placement == Placement.HOST.value and not cupy_ok():
        raise BenchError("--placement host needs CuPy; pip install 'engram-serve[gpu]'")
    if placement == Placement.CPU.value and cuda:
        raise BenchError(
            "--placement cpu runs on the CPU only; use --device cpu, or --placement host on CUDA"
        )
    allowed = valid_gathers(Placement(placement))
    # by default every path of the tier except plain 'resident', which the baseline already is
    default = [g for g in allowed if g != "resident"] or list(allowed)
    gathers = args.gathers.split(",") if args.gathers else default
    for g in gathers:
        if g not in allowed:
            raise BenchError(
                f"gather {g!r} does not work with --placement {placement}; "
                f"use one of {', '.join(allowed)}"
            )
    dedups = {"off": [False], "on": [True], "both": [False, True]}[args.dedup]
    base = PathSpec(Placement.GPU.value if cuda else Placement.CPU.value, "resident")
    paths = [base]
    for g in gathers:
        for d in dedups:
            spec = PathSpec(placement, g, d)
            if spec not in paths:
                paths.append(spec)
    return paths


def resolve_workload(args, device: torch.device, max_positions: int) -> Workload:
    n, m, budget, sizes, steps, micro, ceiling_mib = DEFAULTS[(args.quick, device.type == "cuda")]
    pick = lambda value, default: default if value is None else value
    wl = Workload(
        num_seqs=pick(args.num_seqs, n),
        prompt_len=args.prompt_len,
        decode_tokens=pick(args.decode_tokens, m),
        max_batched_tokens=pick(args.max_batched_tokens, budget),
        batch_sizes=pick(args.batch_sizes, sizes),
        sweep_prompt_len=args.sweep_prompt_len,
        sweep_steps=pick(args.sweep_steps, steps),
        sweep_warmup=2,
        micro_rows=pick(args.micro_rows, [1 << k for k in micro]),
        micro_repeats=args.repeats,
        ceiling_bytes=ceiling_mib << 20,
        seed=args.seed,
        runs=pick(args.runs, 1 if device.type == "cuda" and not args.quick else 3),
    )
    for name in ("num_seqs", "max_batched_tokens", "sweep_prompt_len", "sweep_steps"):
        if getattr(wl, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if wl.decode_tokens < 0 or wl.micro_repeats < 1 or wl.runs < 1:
        raise BenchError("--decode-tokens must be >= 0, --repeats and --runs >= 1")
    # prompts must leave room for the decode tokens within the model's positions
    room = max_positions - wl.decode_tokens - 1
    if room < 1:
        raise BenchError(
            f"--decode-tokens {wl.decode_tokens} leaves no room for a prompt within the "
            f"model's {max_positions} positions"
        )
    lo, hi = wl.prompt_len
    wl.prompt_len = (min(lo, room), min(hi, room))
    sweep_room = max_positions - wl.sweep_steps - wl.sweep_warmup - 1
    if wl.sweep_prompt_len > sweep_room:
        raise BenchError(
            f"--sweep-prompt-len {wl.sweep_prompt_len} plus {wl.sweep_steps} steps exceeds the "
            f"model's {max_positions} positions"
        )
    return wl


def load_source(args, device: torch.device, dtype: str, progress: bool) -> ModelSource:
    if args.synthetic:
        try:
            return synthetic_source(
                args.synthetic, args.engram_params, args.layers, dtype, device, args.seed, progress
            )
        except ValueError as e:
            raise BenchError(str(e)) from None
    if args.layers is not None:
        raise BenchError("--layers only applies to --synthetic models")
    directory = Path(args.model) if args.model else default_model_dir()
    if args.model is None and not (directory / "config.json").is_file():
        raise BenchError(
            f"the built-in default model is not at {directory} (not trained yet?); "
            "pass --model DIR or --synthetic NAME"
        )
    try:
        src = checkpoint_source(directory, dtype, device, progress)
    except (OSError, ValueError) as e:
        raise BenchError(str(e)) from None
    if not src.model.config.engram_layer_ids:
        raise BenchError(f"the model at {directory} has no Engram layers; nothing to offload")
    return src


def run(args, command: str) -> tuple[dict, Path, int]:
    progress = sys.stderr.isatty()
    device = resolve_device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be at least 1, got {threads}")
        # one compute thread keeps OpenMP from spinning against a busy machine's other work
        torch.set_num_threads(threads)
    paths = resolve_paths(args, device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    src = load_source(args, device, dtype, progress)
    cfg = src.model.config
    wl = resolve_workload(args, device, cfg.max_position_embeddings)
    env = environment(device)
    now = dt.datetime.now(dt.timezone.utc).astimezone()
    tag = "cpu" if device.type == "cpu" else slug(env["device"])
    out_dir = Path(args.out or f"bench/results/{now:%Y%m%d-%H%M%S}-{tag}")

    ceiling = measure_ceiling(device, wl.ceiling_bytes)
    rows, tokens = [], []
    # baseline first, then the rows sharing its tier, then the others grouped by tier
    ordered = [paths[0]] + sorted(paths[1:], key=lambda p: p.placement != paths[0].placement)
    keep = Placement.HOST.value if device.type == "cuda" else Placement.CPU.value
    bar = tqdm(ordered, desc=PROG, unit="row", disable=not progress)
    for k, spec in enumerate(bar):
        bar.set_postfix_str(spec.name)
        try:
            row, toks = run_path(src, spec, wl, device, ceiling["gbps"], progress)
        except (RuntimeError, ValueError) as e:  # CUDA OOM, a failed gather, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BenchError(f"row '{spec.name}' failed: {type(e).__name__}: {first}") from e
        rows.append(row)
        tokens.append(toks)
        if spec.placement != keep and spec.placement not in {p.placement for p in ordered[k + 1 :]}:
            src.drop(spec.placement)  # free a tier's tables once no row needs them

    failures = []
    for row, toks in zip(rows, tokens):
        diff = first_difference(tokens[0], toks) if row is not rows[0] else None
        row["tokens_match"] = diff is None
        if diff is not None:
            key, seq, pos = diff
            failures.append(
                f"row '{row['name']}' produced different tokens than the resident baseline "
                f"'{rows[0]['name']}' ({key} workload, sequence {seq}, first difference at "
                f"generated token {pos})"
            )
    add_penalties(rows)
    micro = run_micro(src, device, wl, ceiling["gbps"], paths[-1].placement)
    src.drop_all()

    res = {
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "environment": env,
        "model": {
            "description": src.description,
            "dtype": dtype,
            "engram_table_params": engram_param_count(src.model),
            "config": cfg.to_dict(),
            **src.info,
        },
        "workload": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(wl).items()},
        "ceiling": ceiling,
        "rows": rows,
        "tokens_identical": not failures,
        "failures": failures,
        "micro": micro,
    }
    return res, out_dir, len(failures)


def write_outputs(res: dict, out_dir: Path, plots: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "bench.json"]
    if plots:
        from .bench_plots import write_plots

        files += write_plots(res, out_dir)
        res["plots"] = [p.name for p in files[1:]]
    files[0].write_text(json.dumps(res, indent=2) + "\n")
    return files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = shlex.join([PROG, *argv])
    try:
        res, out_dir, failed = run(args, command)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    files = write_outputs(res, out_dir, not args.no_plots)
    print(report(res))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    for msg in res["failures"]:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
