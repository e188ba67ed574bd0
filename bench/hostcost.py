"""``engram-bench --host-cost``: the host's CPU time per decode step, by component.

Each point (batch size B, context length C) seats B sequences whose C-token prompts are
already in the KV cache (their cache contents are zeros: prefill is not what is measured),
runs a few untimed decode steps, then times ``--steps`` decode steps with a
:class:`engine.host_time.HostTimer`. Rounds are interleaved: every round runs every point in
every mode, in a rotated order. Per point and mode the figures are medians over the rounds
(each round's own figure: the median over its steps) with their min-max.

- host µs per step: the host thread's CPU time, without the parts that run on the device on a
  GPU (the forward pass, the sampling kernels; ``engine.host_time.DEVICE_PARTS``);
- untimed host µs per step (overlapped, on a CPU): every other timed step runs without the
  per-part timer, and its figure is the host thread's CPU time over the whole step (the
  device's parts run on the worker); the timer's own cost (~1.5 µs a part) is not in it;
- device µs per step: those parts (on a CPU they run in the host thread or its worker);
- device idle share: the part of the step's wall time the device waits for the host (in
  series: host / (host + device); overlapped: 1 - the worker's time on the job the step reads
  / the step's wall time, the worker being the device's side, which on a CPU runs the forward
  pass).
- context switches per step: the host thread's (``getrusage``); overlapped, the host and the
  worker take turns with the GIL, and each hand-over costs the host thread a switch's CPU
  time (on a GPU the worker's job is kernel launches; on a CPU it is the device's stand-in).

Each point runs with two stand-ins for the device (``--stand-in``): ``forward``, the model's
own forward pass on the CPU, and ``idle``, the forward pass replaced by rows of a fixed pool
of random logits (the step's shape, so tokens vary and every host path runs as it does).
On a CPU the forward pass shares the host's caches and memory bandwidth (in series on the
same core; overlapped on the other core, the last-level cache shared): at long contexts its
pass over the KV cache evicts the host's working set and the host's own parts run slower,
which a GPU's forward pass does not do. ``idle`` is the host's cost without that; the
difference between the two is the CPU stand-in's, not the engine's.

``--device cuda`` measures the same on a GPU: the model and KV cache on it, decode steps
replayed from CUDA graphs as the server runs them, the device's own forward pass the only
stand-in (``idle`` replaces the eager forward pass, which graph steps do not call). The
host's wait for a step's tokens there is the ``sync`` part, a device part (a CUDA wait may
spin on the host's CPU). The worker's time on a job is then its kernel launches, not the
device's time, so a GPU run takes the device's time per step from the same point in series
(its wall time less its host time) and the device idle share overlapped from that:
``1 - device / wall``.

Results: ``hostcost.json`` (every raw figure and the command) and ``host_cost.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.host_time import DEVICE_PARTS, HostTimer
from engine.kv_cache import KVCache, blocks_for
from engine.sampling import SamplingParams
from engine.sequence import Status
from models.checkpoint import load_checkpoint
from models.llama import rope_cache

from .provenance import environment
from .stats import summarize

PROG = "engram-bench --host-cost"
MODES = ("overlap", "no-overlap")
STAND_INS = ("forward", "idle")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--batch-sizes", default="1,32,256", help="comma list (default 1,32,256)")
    ap.add_argument("--contexts", default="128,2048", help="comma list (default 128,2048)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps per round")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--sampled", action="store_true", help="temperature 1 instead of greedy")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the model and the KV cache live (cuda: decode steps from CUDA graphs)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--stand-in",
        default=None,
        help="comma list of the device's stand-ins: 'forward' (the device's forward pass), "
        "'idle' (random logits of the step's shape, nothing else touched; CPU only); default "
        "both on a CPU, forward on CUDA",
    )
    ap.add_argument(
        "--out", default=None, help="output dir (default bench/results/DATE-DEVICE-host-cost)"
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--markdown",
        nargs="+",
        metavar="DIR",
        default=None,
        help="print the README's table (overlapped, in series, untimed) from these result "
        "directories' hostcost.json, one column group each, and exit",
    )
    return ap


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class IdleDevice:
    """The ``idle`` stand-in for the forward pass: the step's logits are rows of a fixed pool
    of random logits, taken at an offset that moves every step (a view: nothing is written,
    the KV cache and the weights are not read)."""

    def __init__(self, rows: int, vocab: int, seed: int, offsets: int = 7) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn((rows + offsets, vocab), generator=gen)
        self.offsets, self.k = offsets, 0

    def __call__(self, input_ids, step, logits_index: torch.Tensor) -> torch.Tensor:
        self.k = (self.k + 1) % self.offsets
        return self.pool[self.k : self.k + logits_index.shape[0]]


@contextmanager
def stand_in(model, device: IdleDevice | None):
    """The model's forward pass replaced by ``device`` inside the block (None: the model's own)."""
    if device is None:
        yield
        return
    model.forward_step = device  # an instance attribute over the method, removed after
    try:
        yield
    finally:
        del model.forward_step


def seat(engine: Engine, batch: int, context: int, params: SamplingParams, rng) -> list:
    """B sequences as they stand after their prefill: C tokens cached, one sampled token
    pending (KV contents zeros), without running the prefill."""
    model, sched = engine.model, engine.scheduler
    n1 = model.config.engram_max_ngram_size - 1
    seqs = []
    for i in range(batch):
        prompt = rng.integers(1, model.config.vocab_size, context).tolist()
        (seq,) = engine.add(f"host-{i}", prompt, params)
        sched.waiting.remove(seq)
        engine.cache.admit(seq)
        engine.cache.reserve(seq, context)
        seq.num_computed, seq.status = context, Status.RUNNING
        seq.scheduled_at = seq.first_token_at = seq.last_token_at = time.monotonic()
        engine.runner.seat(seq, model.compress(np.asarray(prompt[-n1:], np.int64)))
        seq.output_ids.append(int(rng.integers(1, model.config.vocab_size)))
        sched.running.append(seq)
        seqs.append(seq)
    return seqs


def _switches() -> int:
    """The calling thread's context switches so far (voluntary and not): overlapped, the host
    thread hands the GIL to the worker and back (each time it waits for a job, and when the
    worker takes the GIL while the host's numpy releases it), and each switch is CPU time the
    host thread is charged in the kernel."""
    use = resource.getrusage(resource.RUSAGE_THREAD)
    return use.ru_nvcsw + use.ru_nivcsw


def run_point(engine: Engine, batch: int, context: int, args, rng) -> dict:
    params = SamplingParams(
        max_tokens=1 << 30, temperature=1.0 if args.sampled else 0.0, ignore_eos=True
    )
    seat(engine, batch, context, params, rng)
    timer = HostTimer()
    overlap = engine.overlap
    steps = []
    # overlapped, every other timed step runs without the per-part timer (about 1.5 µs a
    # part, the instrument's and not the engine's): its host cost is the thread's CPU time
    # over the whole step, since the device's parts run on the worker (not on CUDA, where
    # the host's wait for the tokens may spin: only the timer keeps it apart, as ``sync``)
    untimed: list[int] = []
    untimed_ok = overlap is not None and engine.device.type != "cuda"
    switches: list[int] = []  # the host thread's context switches in each timed step
    with timer:
        for k in range(args.warmup + args.steps):
            if untimed_ok and k >= args.warmup and (k - args.warmup) % 2:
                c0 = time.thread_time_ns()
                engine.step()
                untimed.append(time.thread_time_ns() - c0)
                continue
            timer.take()
            gc0 = timer.gc_ns
            read = overlap.inflight if overlap is not None else None  # the job this step reads
            sw0 = _switches()
            w0 = time.perf_counter_ns()
            engine.step(timer)
            wall = time.perf_counter_ns() - w0
            switched = _switches() - sw0
            parts = timer.take()
            if overlap is not None:
                # the device's side ran on the worker: the worker's time on the job this step
                # read (it waited for it), not the busy time that happened to end inside the
                # step (a job that ends between two steps would be in neither)
                parts["device"] = 0 if read is None else int(1e9 * read.future.busy_s)
            if k >= args.warmup:
                steps.append((parts, wall, timer.gc_ns - gc0))
                switches.append(switched)
    engine.abort(list(engine.scheduler.running))
    while engine.has_work:  # the step still in flight: nothing of it is kept
        engine.step()
    names = sorted({n for p, _, _ in steps for n in p})
    per = {n: float(np.median([p.get(n, 0) for p, _, _ in steps])) / 1e3 for n in names}
    host = [sum(v for n, v in p.items() if n not in DEVICE_PARTS) / 1e3 for p, _, _ in steps]
    dev = [sum(v for n, v in p.items() if n in DEVICE_PARTS) / 1e3 for p, _, _ in steps]
    wall = [w / 1e3 for _, w, _ in steps]
    if overlap is not None:  # overlapped: the device idles for the part of the step it is not busy
        idle = [max(0.0, 1.0 - d / w) if w else 0.0 for d, w in zip(dev, wall)]
    else:  # in series the device waits for all of the host's work
        idle = [h / (h + d) if h + d else 0.0 for h, d in zip(host, dev)]
    return {
        "host_us": float(np.median(host)),
        **({"host_untimed_us": float(np.median(untimed)) / 1e3} if untimed else {}),
        "device_us": float(np.median(dev)),
        "wall_us": float(np.median(wall)),
        "gc_us": float(np.median([g for _, _, g in steps])) / 1e3,
        "switches": float(np.mean(switches)),
        "device_idle": float(np.median(idle)),
        "parts_us": per,
    }


def stand_ins_for(args, device: torch.device) -> list[str]:
    """The stand-ins ``--stand-in`` names (default: both on a CPU, the forward pass on CUDA)."""
    default = "forward" if device.type == "cuda" else ",".join(STAND_INS)
    asked = (args.stand_in or default).split(",")
    kinds = [k for k in STAND_INS if k in asked]
    if not kinds or set(asked) - set(STAND_INS):
        raise SystemExit(f"{PROG}: --stand-in takes a comma list of {', '.join(STAND_INS)}")
    if device.type == "cuda" and "idle" in kinds:
        raise SystemExit(
            f"{PROG}: the idle stand-in replaces the eager forward pass, and decode steps on "
            "CUDA replay graphs: use --stand-in forward with --device cuda"
        )
    return kinds


def device_from_series(results: list[dict], raw: dict) -> None:
    """On a GPU the worker's time on a job is its launches: each overlapped point's device
    time is the same point's in series (wall less host, per round), its idle share
    ``1 - device / wall``."""
    for x in results:
        if x["mode"] != "overlap":
            continue
        series = raw[(x["batch"], x["context"], "no-overlap", x["stand_in"])]
        dev = [max(0.0, r["wall_us"] - r["host_us"]) for r in series]
        walls = [r["wall_us"] for r in raw[(x["batch"], x["context"], "overlap", x["stand_in"])]]
        x["device_us"] = summarize(dev)
        x["device_idle"] = summarize(
            [max(0.0, 1.0 - d / w) if w else 0.0 for d, w in zip(dev, walls)]
        )


def run(args) -> dict:
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{PROG}: torch sees no CUDA device; run on a CPU without --device cuda")
    kinds = stand_ins_for(args, device)
    batches, contexts = _ints(args.batch_sizes), _ints(args.contexts)
    model, tok = load_checkpoint(args.model)
    total_steps = args.warmup + args.steps + 2
    longest = max(contexts) + total_steps
    if longest > model.config.max_position_embeddings:  # host cost past the trained limit
        model.config = replace(model.config, max_position_embeddings=longest)
        model.rope_cos, model.rope_sin = rope_cache(model.config)
    model = model.to(device)
    bs, top = 16, max(batches)
    cache = KVCache(
        model.config,
        num_blocks=top * blocks_for(longest, bs),
        block_size=bs,
        max_seqs=top,
        dtype=torch.float32,
        device=device,
    )
    points = [(b, c) for c in contexts for b in batches]
    devices = {"forward": None}
    if "idle" in kinds:
        devices["idle"] = IdleDevice(top, model.config.vocab_size, args.seed)
    engines = {}
    for b in batches:
        for mode in MODES:
            cfg = EngineConfig(
                device=args.device,
                max_num_seqs=b,
                max_num_batched_tokens=max(b, 1024),
                block_size=bs,
                no_overlap=mode == "no-overlap",
            )
            engines[b, mode] = Engine(model, cfg, tokenizer=tok, cache=cache)
    gc.collect()
    gc.freeze()  # as the server does after start-up
    rng = np.random.default_rng(args.seed)
    raw: dict[tuple, list[dict]] = {}
    jobs = [(b, c, m, k) for b, c in points for m in MODES for k in kinds]
    for b, c, m, k in jobs:  # warm-up: every path once, untimed
        with stand_in(model, devices[k]):
            run_point(engines[b, m], b, c, replace_steps(args, 2), rng)
    for r in range(args.repeats):
        order = jobs[r % len(jobs) :] + jobs[: r % len(jobs)]
        for job in order:
            b, c, m, k = job
            with stand_in(model, devices[k]):
                got = run_point(engines[b, m], b, c, args, rng)
            raw.setdefault(job, []).append(got)
            print(
                f"round {r + 1}/{args.repeats} {m} B={b} ctx={c} {k}: {got['host_us']:.0f} µs",
                file=sys.stderr,
            )
    results = []
    for job in jobs:
        b, c, m, k = job
        rounds = raw[job]
        parts = sorted({n for x in rounds for n in x["parts_us"]})
        results.append(
            {
                "mode": m,
                "batch": b,
                "context": c,
                "stand_in": k,
                **{
                    k: summarize([x[k] for x in rounds])
                    for k in (
                        "host_us",
                        "host_untimed_us",
                        "device_us",
                        "wall_us",
                        "gc_us",
                        "switches",
                        "device_idle",
                    )
                    if k in rounds[0]
                },
                "parts_us": {
                    n: summarize([x["parts_us"].get(n, 0.0) for x in rounds]) for n in parts
                },
            }
        )
    if device.type == "cuda":
        device_from_series(results, raw)
    for e in engines.values():
        e.close()
    gc.unfreeze()
    return {
        "kind": "host-cost",
        "sampled": args.sampled,
        "steps": args.steps,
        "repeats": args.repeats,
        "device_parts": sorted(DEVICE_PARTS),
        # other jobs share the machine: its 1-minute load average as the run started and ended
        "load_average": {"start": load_start[0], "end": os.getloadavg()[0]},
        "environment": environment(device),
        "results": results,
    }


def replace_steps(args, steps: int):
    return argparse.Namespace(**{**vars(args), "steps": steps, "warmup": 1})


def table(res: dict) -> str:
    lines = [
        "host µs per decode step (median, min-max over rounds); device = forward + sampling "
        "kernels; untimed: overlapped steps without the per-part timer; sw: the host thread's "
        "context switches per step",
        f"{'mode':<11} {'B':>4} {'ctx':>5} {'device':<8} {'host µs':>22} {'untimed µs':>20} "
        f"{'device µs':>10} {'idle':>5} {'sw':>4}  largest parts",
    ]
    for x in res["results"]:
        h = x["host_us"]
        u = x.get("host_untimed_us")
        untimed = f"{u['median']:>8.0f} ({u['min']:.0f}-{u['max']:.0f})" if u else "-"
        parts = sorted(
            ((n, s["median"]) for n, s in x["parts_us"].items() if n not in DEVICE_PARTS),
            key=lambda kv: -kv[1],
        )[:4]
        top = ", ".join(f"{n} {v:.0f}" for n, v in parts)
        sw = f"{x['switches']['median']:.1f}" if "switches" in x else "-"
        lines.append(
            f"{x['mode']:<11} {x['batch']:>4} {x['context']:>5} {x.get('stand_in', 'forward'):<8} "
            f"{h['median']:>8.0f} ({h['min']:.0f}-{h['max']:.0f}){'':>3} {untimed:>20} "
            f"{x['device_us']['median']:>10.0f} {x['device_idle']['median']:>5.0%} {sw:>4}  {top}"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["results"]
    names = sorted({n for x in rows for n in x["parts_us"] if n not in DEVICE_PARTS})
    labels = [
        f"{x['mode']}\nB={x['batch']} ctx={x['context']}\n{x.get('stand_in', 'forward')}"
        for x in rows
    ]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows)), 4.5))
    bottom = np.zeros(len(rows))
    for n in names:
        vals = np.array([x["parts_us"].get(n, {"median": 0.0})["median"] for x in rows])
        ax.bar(labels, vals, bottom=bottom, label=n)
        bottom += vals
    ax.set_ylabel("host µs per decode step (median)")
    ax.set_title(
        f"host cost per decode step by component\n{res['environment']['device']}", fontsize=9
    )
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(dirs: list[str]) -> str:
    """Host µs per step, median (min-max), per point: for each result directory its in-series,
    overlapped and overlapped-untimed figures with the forward pass as the device's stand-in,
    then (runs that have them) in series and overlapped with the idle stand-in, and the last
    one's device idle share (forward)."""

    def cell(s: dict | None) -> str:
        return "-" if s is None else f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"

    runs = [json.loads((Path(d) / "hostcost.json").read_text()) for d in dirs]
    by = [
        {
            (x["mode"], x["batch"], x["context"], x.get("stand_in", "forward")): x
            for x in r["results"]
        }
        for r in runs
    ]
    idle = [any(key[3] == "idle" for key in got) for got in by]
    head = ["batch", "context"]
    for d, has_idle in zip(dirs, idle):
        name = Path(d).name.replace("-cpu-host-cost", "") or Path(d).name
        head += [f"{name}: in series", f"{name}: overlapped", f"{name}: overlapped, untimed"]
        if has_idle:
            head += [f"{name}: in series, idle device", f"{name}: overlapped, idle device"]
    head.append("device idle, overlapped")
    points = sorted({(x["context"], x["batch"]) for x in runs[-1]["results"]})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, b in points:
        row = [str(b), str(c)]
        for got, has_idle in zip(by, idle):
            ser, ov = (
                got.get(("no-overlap", b, c, "forward")),
                got.get(("overlap", b, c, "forward")),
            )
            row += [
                cell(ser and ser["host_us"]),
                cell(ov and ov["host_us"]),
                cell(ov and ov.get("host_untimed_us")),
            ]
            if has_idle:
                ser, ov = got.get(("no-overlap", b, c, "idle")), got.get(("overlap", b, c, "idle"))
                row += [cell(ser and ser["host_us"]), cell(ov and ov["host_us"])]
        ov = by[-1].get(("overlap", b, c, "forward"))
        row.append("-" if ov is None else f"{ov['device_idle']['median']:.0%}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    res = run(args)
    res["command"] = shlex.join(["engram-bench", "--host-cost", *argv])
    out = Path(args.out or f"bench/results/{dt.date.today().isoformat()}-{args.device}-host-cost")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "hostcost.json"]
    files[0].write_text(json.dumps(res, indent=1) + "\n")
    if not args.no_plots:
        files.append(plot(res, out / "host_cost.png"))
    print(table(res))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0
