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
import importlib.util
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from models.checkpoint import default_model_dir
from offload import paths
from offload.link import measure_link
from offload.store import Placement

from .micro import run_micro
from .report import PROG, environment, report, slug
from .run import BenchError, PathSpec, Workload, add_penalties, run_path, token_failures
from .source import ModelSource, checkpoint_source, synthetic_source
from .synthetic import SHAPES, engram_param_count

# (quick, cuda) -> num seqs, decode tokens, tokens/step budget, sweep batch sizes, sweep steps,
# microbenchmark rows (log2), ceiling copy size (MiB)
DEFAULTS = {
    (True, False): (8, 32, 512, [1, 4, 16], 16, (10, 12, 14, 16), 64),
    (False, False): (16, 64, 2048, [1, 8, 32, 64], 16, (10, 12, 14, 16, 18), 256),
    (True, True): (16, 32, 4096, [1, 8, 32], 16, (10, 14, 18), 256),
    (False, True): (128, 128, 8192, [1, 8, 32, 128, 512], 32, (10, 12, 14, 16, 18, 20), 1024),
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
    ap.add_argument("--quick", action="store_true", help="small workload, under a minute on CPU")
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


# --- resolving them ---------------------------------------------------------------------------
def resolve_device(choice: str) -> torch.device:
    try:
        return paths.resolve_device(choice)
    except ValueError as e:
        raise BenchError(str(e)) from None


def resolve_paths(args, device: torch.device) -> list[PathSpec]:
    """The baseline (resident on the compute device) and every offloaded path asked for."""
    cuda = device.type == "cuda"
    placement = Placement(args.placement or ("host" if cuda else "cpu"))
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


def run_rows(
    src: ModelSource,
    paths: list[PathSpec],
    wl: Workload,
    device: torch.device,
    ceiling_gbps: float,
    progress: bool,
) -> tuple[list[dict], list[dict[str, list[list[int]]]]]:
    """Every row, the baseline first, then the rows sharing its tier, then the others grouped
    by tier (so each tier's tables are built once and freed once no later row needs them)."""
    rows, tokens = [], []
    ordered = [paths[0]] + sorted(paths[1:], key=lambda p: p.placement != paths[0].placement)
    keep = Placement.HOST.value if device.type == "cuda" else Placement.CPU.value
    bar = tqdm(ordered, desc=PROG, unit="row", disable=not progress)
    for k, spec in enumerate(bar):
        bar.set_postfix_str(spec.name)
        try:
            row, toks = run_path(src, spec, wl, device, ceiling_gbps, progress)
        except (RuntimeError, ValueError) as e:  # CUDA OOM, a failed gather, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BenchError(f"row '{spec.name}' failed: {type(e).__name__}: {first}") from e
        rows.append(row)
        tokens.append(toks)
        if spec.placement != keep and spec.placement not in {p.placement for p in ordered[k + 1 :]}:
            src.drop(spec.placement)
    return rows, tokens


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

    ceiling = measure_link(device, wl.ceiling_bytes)
    rows, tokens = run_rows(src, paths, wl, device, ceiling.gbps, progress)
    failures = token_failures(rows, tokens)
    add_penalties(rows)
    micro = run_micro(src, device, wl, ceiling.gbps, paths[-1].placement)
    table_memory = src.store(paths[-1].placement).describe()  # formats, huge pages, registered
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
            "table_memory": table_memory,
            **src.info,
        },
        "workload": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(wl).items()},
        "ceiling": {**asdict(ceiling), "gbps": ceiling.gbps},
        "rows": rows,
        "tokens_identical": not failures,
        "failures": failures,
        "micro": micro,
    }
    return res, out_dir, len(failures)


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
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
