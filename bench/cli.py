"""``engram-bench``: the offload penalty report.

One process, one model, the same jobs on every path: the resident baseline and every
offloaded gather path, each with its own prefetcher and engine built once (they share one KV
cache; only one runs at a time). Every path first runs every job once untimed (warm-up, with
the checks), then the jobs are timed in ``--repeats`` interleaved rounds, rotating the paths'
order. Each figure is a median with its min-max; a penalty smaller than the baseline's own
spread is reported as noise. Per path: rows bit-identical to the resident table (always
required), greedy tokens identical to the baseline (required in ``--deterministic`` mode, the
default; otherwise the share is reported), logits' largest difference; bytes a step must read
against peak memory bandwidth, the GPU-busy share (CUDA), stall and achieved GB/s against the
link ceiling, memory.

Jobs: ``paper`` (N prompts of Uniform(MIN, MAX) random tokens, chunked prefill then M decode
steps, both timed) and one ``sweep`` point per batch size (steady decode, timed after an
untimed prefill). A gather microbenchmark (CUDA: staged vs UVA vs device-resident; CPU:
resident vs worker thread) times rows per gather against the same ceiling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine import determinism
from models.checkpoint import default_model_dir
from models.dtype import CHOICES as DTYPE_CHOICES
from models.dtype import resolve_dtype, stored_dtype
from offload import paths
from offload.link import measure_link
from offload.store import Placement

from .micro import ROW_VALUES, run_micro
from .phase import phase
from .provenance import environment
from .report import PROG, report, slug
from .roofline import kv_bytes_per_token, measure_memory_bandwidth, weight_bytes
from .rounds import run_paths
from .source import ModelSource, checkpoint_source, synthetic_source
from .summary import Context, build_rows, failures
from .synthetic import SHAPES, engram_param_count
from .workload import BenchError, PathSpec, Workload

# (quick, cuda) -> num seqs, decode tokens, tokens/step budget, sweep batch sizes, sweep steps,
# microbenchmark rows (log2), link ceiling copy (MiB), memory-bandwidth copy (MiB)
DEFAULTS = {
    (True, False): (8, 32, 512, [1, 4, 16], 16, (10, 12, 14, 16), 64, 64),
    (False, False): (16, 64, 2048, [1, 8, 32, 64], 16, (10, 12, 14, 16, 18), 256, 256),
    (True, True): (16, 32, 4096, [1, 8, 32], 16, (10, 14, 18), 256, 256),
    (False, True): (128, 128, 8192, [1, 8, 32, 128, 512], 32, (10, 12, 14, 16, 18, 20), 1024, 1024),
}


# --- arguments -------------------------------------------------------------------------------
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
        choices=list(DTYPE_CHOICES),
        default="auto",
        help="backbone dtype (auto: the checkpoint's half precision on CUDA, bfloat16 for a "
        "synthetic model; float32 on CPU)",
    )
    ap.add_argument(
        "--placement",
        choices=[p.value for p in Placement],
        default=None,
        help="offloaded tier (default: host with CUDA and CuPy, gpu with CUDA only, else cpu)",
    )
    ap.add_argument(
        "--gathers",
        default=None,
        help="comma list of gather paths for that tier (default: all but 'resident')",
    )
    ap.add_argument("--dedup", choices=["off", "on", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="small workload, under a minute on CPU")
    ap.add_argument("--num-seqs", type=int, default=None)
    ap.add_argument("--prompt-len", type=_range, default=(100, 1024), metavar="MIN,MAX")
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--max-batched-tokens", type=int, default=None)
    ap.add_argument("--batch-sizes", type=_int_list, default=None, metavar="B1,B2,...")
    ap.add_argument("--sweep-steps", type=int, default=None)
    ap.add_argument("--sweep-prompt-len", type=int, default=16)
    ap.add_argument("--micro-rows", type=_int_list, default=None, metavar="N1,N2,...")
    ap.add_argument("--micro-repeats", type=int, default=3, help="microbenchmark repeats")
    ap.add_argument(
        "--micro-values",
        type=_int_list,
        default=None,
        metavar="V1,V2,...",
        help="bf16 values per row of the microbenchmark tables (default 64,128,256)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timed rounds, after one warm-up run (default 3; 1 with --quick)",
    )
    ap.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic kernels, and fail unless every path's greedy tokens are identical "
        "(--no-deterministic: report the share of identical tokens instead)",
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
    ap.add_argument(
        "--no-overlap",
        action="store_true",
        help="the engine runs each step's host work in series with the device",
    )
    ap.add_argument(
        "--no-micro",
        action="store_true",
        help="skip the gather microbenchmark (another run has it)",
    )
    return ap


# --- resolving them ---------------------------------------------------------------------------
def resolve_device(choice: str) -> torch.device:
    try:
        return paths.resolve_device(choice)
    except ValueError as e:
        raise BenchError(str(e)) from None


def resolve_paths(args, device: torch.device) -> list[PathSpec]:
    """The baseline (resident on the compute device) and every offloaded path asked for."""
    cuda = device.type == "cuda"
    # host with CUDA and CuPy, gpu with CUDA only, cpu without: the server's default too
    placement = Placement(args.placement) if args.placement else paths.default_placement(device)
    # by default every path of the tier except plain 'resident', which the baseline already is
    allowed = paths.valid_gathers(placement)
    default = [g for g in allowed if g != "resident"] or list(allowed)
    gathers = args.gathers.split(",") if args.gathers else default
    try:
        for g in gathers:
            paths.resolve(device, placement, g)
    except ValueError as e:
        raise BenchError(str(e)) from None
    dedups = {"off": [False], "on": [True], "both": [False, True]}[args.dedup]
    base = PathSpec(Placement.GPU.value if cuda else Placement.CPU.value, "resident")
    specs = [base]
    for g in gathers:
        for d in dedups:
            spec = PathSpec(placement.value, g, d)
            if spec not in specs:
                specs.append(spec)
    return specs


def resolve_workload(args, device: torch.device, max_positions: int) -> Workload:
    defaults = DEFAULTS[(args.quick, device.type == "cuda")]
    n, m, budget, sizes, steps, micro, ceiling_mib, memory_mib = defaults
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
        micro_repeats=args.micro_repeats,
        micro_values=tuple(pick(args.micro_values, list(ROW_VALUES))),
        ceiling_bytes=ceiling_mib << 20,
        memory_bytes=memory_mib << 20,
        seed=args.seed,
        repeats=pick(args.repeats, 1 if args.quick else 3),
        overlap=not args.no_overlap,
    )
    names = ("num_seqs", "max_batched_tokens", "sweep_prompt_len", "sweep_steps", "repeats")
    for name in (*names, "micro_repeats"):
        if getattr(wl, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if wl.decode_tokens < 0:
        raise BenchError("--decode-tokens must be >= 0")
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
    started = time.perf_counter()
    progress = sys.stderr.isatty()
    device = resolve_device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be at least 1, got {threads}")
        # one compute thread keeps OpenMP from spinning against a busy machine's other work
        torch.set_num_threads(threads)
    specs = resolve_paths(args, device)
    stored = None if args.synthetic else stored_dtype(args.model or default_model_dir())
    dtype = resolve_dtype(args.dtype, device, stored).name
    # before anything touches CUDA: cuBLAS reads its workspace setting once
    previous = determinism.set_deterministic(True) if args.deterministic else None
    try:
        return _run(args, command, started, progress, device, specs, dtype)
    finally:
        if previous is not None:
            determinism.apply(previous)


def _run(args, command, started, progress, device, specs, dtype) -> tuple[dict, Path, int]:
    say = (lambda what: None) if progress else (lambda what: phase(f"{PROG}: {what}", sys.stderr))
    src = load_source(args, device, dtype, progress)
    say(f"loaded {args.synthetic or 'the checkpoint'} on {device}; measuring the link")
    cfg = src.model.config
    wl = resolve_workload(args, device, cfg.max_position_embeddings)
    env = environment(device)
    now = dt.datetime.now(dt.timezone.utc).astimezone()
    tag = "cpu" if device.type == "cpu" else slug(env["device"])
    out_dir = Path(args.out or f"bench/results/{now:%Y%m%d-%H%M%S}-{tag}")

    ceiling = measure_link(device, wl.ceiling_bytes)
    # only CUDA has a link between the tables and compute; a CPU's host memcpy is a reference
    # figure that cache-resident gathers beat, not a ceiling
    link_gbps = ceiling.gbps if device.type == "cuda" else None
    memory = measure_memory_bandwidth(device, wl.memory_bytes)
    say(f"running {', '.join(s.name for s in specs)}")
    benches, jobs, times = run_paths(src, specs, wl, device, args.deterministic, progress)
    ctx = Context(
        link_gbps,
        memory["gbps"],
        weight_bytes(src.model),
        kv_bytes_per_token(src.model),
        wl.repeats,
    )
    built = build_rows(benches, jobs, ctx)
    del benches  # their engines and KV cache: the microbenchmark needs the memory
    rows = built["rows"]
    failed = failures(rows, args.deterministic)
    t0 = time.perf_counter()
    micro = {"skipped": "--no-micro"}
    if not args.no_micro:
        say("gather microbenchmark")
        micro = run_micro(src, device, wl, link_gbps, specs[-1].placement)
    times["micro_s"] = time.perf_counter() - t0
    table_memory = src.store(specs[-1].placement).describe()  # formats, huge pages
    src.drop_all()
    times["total_s"] = time.perf_counter() - started

    res = {
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "environment": env,
        "deterministic": {
            "enabled": args.deterministic,
            "settings": determinism.current().as_dict(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
        "model": {
            "description": src.description,
            "dtype": dtype,
            "engram_table_params": engram_param_count(src.model),
            "weight_bytes_per_step": ctx.weight_bytes,
            "kv_bytes_per_token": ctx.kv_bytes_per_token,
            "config": cfg.to_dict(),
            "table_memory": table_memory,
            **src.info,
        },
        "workload": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(wl).items()},
        "ceiling": {**asdict(ceiling), "gbps": ceiling.gbps, "link": link_gbps is not None},
        "memory_bandwidth": memory,
        "rows": rows,
        "host_rss_bytes": built["host_rss_bytes"],
        "rows_identical": all(r["checks"]["rows"]["ok"] for r in rows),
        "tokens_identical": all(r["checks"]["tokens"]["all_identical"] for r in rows),
        "failures": failed,
        "micro": micro,
        "bench_seconds": times,
    }
    return res, out_dir, len(failed)


# --- outputs ---------------------------------------------------------------------------------
def write_outputs(res: dict, out_dir: Path, plots: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "bench.json"]
    if plots:
        from .plots import write_plots

        files += write_plots(res, out_dir)
        res["plots"] = [p.name for p in files[1:]]
    files[0].write_text(json.dumps(res, indent=2) + "\n")
    return files


# Benchmarks of their own, picked by one flag: flag -> module of this package with a main(argv).
MODES = {
    "--host-cost": "hostcost",
    "--http-cost": "httpcost",
    "--hot-cache": "hotcache",
    "--memories": "memories",
    "--tiers": "tiers",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag, module in MODES.items():  # each its own report with its own flags
        if flag in argv:
            own_main = importlib.import_module(f".{module}", __package__).main
            return own_main([a for a in argv if a != flag])
    args = build_parser().parse_args(argv)
    command = shlex.join([PROG, *argv])
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print(
            f"{PROG}: error: plots need matplotlib: pip install 'engram-serve[bench]' "
            "(or pass --no-plots)",
            file=sys.stderr,
        )
        return 2
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
