"""``bench/gpu-check``: the first thing to run on a GPU machine, one command, under 8 minutes.

Stages, each in its own process inside one overall deadline (a stage that fails, crashes or
runs out of time never stops the next ones; see :mod:`bench.gpu_run` for the budgets):

1. environment: device, driver, versions, commit, which optional modules import;
2. startup: the built-in model loaded as the server loads it (as stored and fp8 rows), warmed
   up, every kernel against its reference, and what the check costs;
3. tests: the gpu-marked tests and the kernel test files that use CUDA when it is there;
4. bench-builtin: engram-bench on the built-in model, resident vs host (uva and staged), a
   short decode sweep, the gather microbenchmark;
5. host-cost: ``engram-bench --host-cost`` on the built-in model: the host's CPU time per
   decode step overlapped and in series with the GPU's forward pass (CUDA graphs), and how
   much of a step the GPU waits for the host;
6. bench-4b: engram-bench on the synthetic dense-4b-like model, the paper workload and the
   B=1/64/256 decode sweep.

The output folder gets exactly three files, rewritten after every stage (a run killed on the
way still leaves what it got): ``gpu-check.json`` (every stage, the provenance),
``summary.md`` (one page) and ``gpu-check.tar.gz`` (the logs and each stage's own files;
re-packed while a stage runs too). Exit status: 0 every check ran and held, 1 a check failed
(or crashed, or ran out of time), 2 none failed but some could not run.

``--cpu`` is a dry run of the same stages and code on a CPU, with CPU-sized workloads (the
attention kernels in Triton's interpreter). Standard library only, so it reports a broken
torch instead of dying with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import commit
from .gpu_read import (
    read_bench,
    read_environment,
    read_host_cost,
    read_startup,
    read_tests,
    tests_so_far,
)
from .gpu_run import NEEDED, REPO, Outcome, Stage, can_run, caps, exit_code, run_stage, share
from .phase import T0, stamp

DEADLINE_S = 450.0  # from the command's start: 7.5 minutes, inside an 8-minute slot
RESERVE_S = 15.0  # kept back from the stages for a SIGKILLed stage and the last files
FILES = ("summary.md", "gpu-check.json", "gpu-check.tar.gz")  # all the output folder gets
ARCHIVE_ROOT = "gpu-check"

# engram-bench arguments per profile: (built-in model, dense-4b-like)
BENCH = {
    "gpu": (
        ["--device", "cuda", "--placement", "host", "--gathers", "uva,staged", "--dedup", "off",
         "--repeats", "3", "--num-seqs", "32", "--decode-tokens", "32", "--batch-sizes", "1,64",
         "--sweep-steps", "16", "--micro-rows", "4096,65536,1048576", "--micro-values", "128"],
        ["--device", "cuda", "--synthetic", "dense-4b-like", "--engram-params", "2e9",
         "--placement", "host", "--gathers", "uva,staged", "--dedup", "off", "--repeats", "3",
         "--num-seqs", "32", "--decode-tokens", "32", "--batch-sizes", "1,64,256",
         "--sweep-steps", "16", "--no-micro"],
    ),
    "cpu": (
        ["--device", "cpu", "--quick", "--dedup", "off", "--repeats", "2", "--num-seqs", "2",
         "--decode-tokens", "2", "--prompt-len", "8,16", "--batch-sizes", "1",
         "--sweep-steps", "2", "--micro-rows", "1024", "--micro-repeats", "1",
         "--micro-values", "64"],
        ["--device", "cpu", "--synthetic", "dense-4b-like", "--layers", "2", "--engram-params",
         "1e5", "--quick", "--dedup", "off", "--repeats", "1", "--num-seqs", "1",
         "--decode-tokens", "2", "--prompt-len", "8,16", "--batch-sizes", "1",
         "--sweep-steps", "2", "--no-micro"],
    ),
}  # fmt: skip
# engram-bench --host-cost per profile (the dry run: one small point, the CPU's forward pass)
HOST_COST = {
    "gpu": ["--host-cost", "--device", "cuda", "--batch-sizes", "1,256", "--contexts",
            "128,2048", "--repeats", "3"],
    "cpu": ["--host-cost", "--batch-sizes", "1", "--contexts", "32", "--repeats", "1",
            "--steps", "2", "--warmup", "1", "--stand-in", "forward"],
}  # fmt: skip
# shares of the deadline (with the default: 25, 75, 110, 80, 40, 120 s)
WEIGHTS = {
    "environment": 25,
    "startup": 75,
    "tests": 110,
    "bench-builtin": 80,
    "host-cost": 40,
    "bench-4b": 120,
}
# the CPU dry run: one kernel-free file run whole, one whose gpu tests skip
TEST_FILES = {"gpu": ["tests"], "cpu": ["tests/test_grid.py", "tests/test_hostmem.py"]}
TEST_ENV = {"gpu": {}, "cpu": {"ENGRAM_GPU_TEST_FILES": "test_grid.py"}}
WEB_STACK = ("fastapi", "uvicorn", "httpx", "openai", "hypothesis", "yaml", "schemathesis")


def plan(work: Path, cpu: bool, plots: bool, engram_params: str | None) -> list[Stage]:
    py, profile = sys.executable, "cpu" if cpu else "gpu"
    flag = ["--cpu"] if cpu else []
    builtin, dense = (list(a) for a in BENCH[profile])
    if engram_params:
        dense[dense.index("--engram-params") + 1] = engram_params
    no_plots = [] if plots else ["--no-plots"]
    interp = {"TRITON_INTERPRET": "1"} if cpu else {}
    junit = ["--junitxml", str(work / "gpu-tests.xml"), "-o", "junit_family=xunit1"]
    pytest = [py, "-m", "pytest", "-v", "-p", "bench.gpu_select", "-p", "no:cacheprovider"]
    pytest += [*junit, "--continue-on-collection-errors", *TEST_FILES[profile]]
    bench = [py, "-m", "bench.cli"]
    gpu = () if cpu else ("cupy",)
    stages = [
        Stage("environment", "environment and versions",
              [py, "-m", "bench.gpu_stages", "environment", str(work), *flag], read_environment,
              needs=("torch", "numpy")),
        Stage("startup", "start-up kernel check (built-in model, as stored and fp8 rows)",
              [py, "-m", "bench.gpu_stages", "startup", str(work), *flag], read_startup,
              needs=(*NEEDED, "triton"), env=interp),
        Stage("tests", "gpu tests (gpu-marked, and the CUDA kernel test files whole)", pytest,
              read_tests(cpu), needs=(*NEEDED, "pytest"), env=TEST_ENV[profile],
              partial=tests_so_far),
        Stage("bench-builtin", "engram-bench, built-in model (+ gather microbenchmark)",
              [*bench, *builtin, *no_plots, "--out", str(work / "builtin")],
              read_bench("builtin"), needs=(*NEEDED, *gpu)),
        Stage("host-cost", "engram-bench --host-cost, built-in model (host µs per decode step)",
              [*bench, *HOST_COST[profile], *no_plots, "--out", str(work / "host-cost")],
              read_host_cost, needs=NEEDED),
        Stage("bench-4b", "engram-bench, synthetic dense-4b-like (paper workload, decode sweep)",
              [*bench, *dense, *no_plots, "--out", str(work / "dense-4b-like")],
              read_bench("dense-4b-like"), needs=(*NEEDED, *gpu)),
    ]  # fmt: skip
    for s in stages:
        s.weight = WEIGHTS[s.name]
    return stages


# --- the three files ---------------------------------------------------------------------------
def _write(path: Path, write) -> None:
    """Write through a temporary name: a kill mid-write leaves the last whole file."""
    part = path.with_name(path.name + ".part")
    write(part)
    os.replace(part, path)


def pack(work: Path, out: Path) -> None:
    def write(part: Path) -> None:
        with tarfile.open(part, "w:gz") as tar:
            tar.add(work, arcname=ARCHIVE_ROOT)

    _write(out / "gpu-check.tar.gz", write)


def pack_running(work: Path, out: Path) -> None:
    """Pack while a stage writes its files: one that moves under the walk waits for the next."""
    try:
        pack(work, out)
    except (OSError, tarfile.TarError) as e:
        print(stamp(f"      (packing the logs so far failed, next time then: {e})"), flush=True)


def publish(result: dict, work: Path, out: Path) -> Path:
    """gpu-check.json, summary.md and the archive, as things stand."""
    from .gpu_summary import render

    result["seconds"] = time.monotonic() - T0
    text = json.dumps(result, indent=2, default=str) + "\n"
    _write(out / "gpu-check.json", lambda p: p.write_text(text))
    (work / "gpu-check.json").write_text(text)
    summary = render(result, work)
    _write(out / "summary.md", lambda p: p.write_text(summary))
    pack(work, out)
    return out / "summary.md"


# --- running it -------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "gpu"


def _out_dir(arg: str | None, env: dict, cpu: bool, started: dt.datetime) -> Path:
    name = "cpu" if cpu else _slug(env.get("device") or "unknown-gpu")
    out = Path(arg) if arg else REPO / "bench" / "results" / f"{started:%Y-%m-%d}-{name}"
    if out.exists() and any(out.iterdir()):
        out = out.with_name(f"{out.name}-{started:%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu-check", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run of every stage on a CPU")
    ap.add_argument("--out", default=None, help="default: bench/results/<date>-<gpu>")
    ap.add_argument("--deadline", "--deadline-s", dest="deadline", type=float,
                    default=DEADLINE_S, help="overall limit in seconds, from the start "
                    f"(default {DEADLINE_S:.0f}); stages share it by weight")  # fmt: skip
    ap.add_argument("--stages", default=None, help="comma-separated subset of: "
                    + ", ".join(WEIGHTS) + " (environment always runs)")  # fmt: skip
    ap.add_argument("--engram-params", default=None, help="dense-4b-like table parameters")
    ap.add_argument("--pack-every", type=float, default=20.0, metavar="S",
                    help="re-pack a running stage's logs every S seconds")  # fmt: skip
    stamp_help = "write the git commit to COMMIT (for a copy without .git) and exit"
    ap.add_argument("--stamp-commit", action="store_true", help=stamp_help)
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in (args.stages or ",".join(WEIGHTS)).split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(WEIGHTS))
    if unknown:
        ap.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(WEIGHTS)}")
    args.stages = ["environment", *(s for s in WEIGHTS if s in chosen and s != "environment")]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.stamp_commit:
        print(f"wrote {commit.stamp()}")
        return 0
    started = dt.datetime.now().astimezone()
    deadline = T0 + args.deadline - RESERVE_S
    have = {m: importlib.util.find_spec(m) is not None for m in (*NEEDED, *WEB_STACK, "triton",
            "cupy", "pytest", "matplotlib")}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result = {
        "status": "running",
        "exit_code": None,
        "profile": "cpu dry run" if args.cpu else "gpu",
        "provenance": {
            "command": shlex.join(["bench/gpu-check", *argv]),
            "date": started.isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            **commit.git_commit(),
        },
        "environment": {},
        "modules": have,
        "deadline_s": args.deadline,
        "stages_selected": args.stages,
        "caps_s": {},
        "seconds": 0.0,
        "stages": [],
    }
    outcomes: list[Outcome] = []
    first, *rest = (s for s in plan(work, args.cpu, False, args.engram_params)
                    if s.name in args.stages)  # fmt: skip
    runnable = [s for s in (first, *rest) if not can_run(s, have)]
    result["caps_s"] = {
        k: round(v, 1) for k, v in caps(runnable, deadline - time.monotonic()).items()
    }
    # named now when given, so the first stage's logs are packed as it runs too; else once
    # the environment stage has named the GPU
    out = _out_dir(args.out, {}, args.cpu, started) if args.out else None

    def run(stage: Stage, i: int, after: list[Stage]) -> None:
        print(stamp(f"[{i + 1}/{len(args.stages)}] {stage.title} ..."), flush=True)
        later = [s for s in after if not can_run(s, have)]
        tick = (lambda: pack_running(work, out)) if out is not None else None
        o = run_stage(stage, work, share(stage, later, deadline), have, tick, args.pack_every)
        outcomes.append(o)
        print(stamp(f"      {o.status} ({o.seconds:.0f} s): {o.detail}"), flush=True)

    def progress(pending: list[Stage]) -> None:
        result["stages"] = [asdict(o) for o in outcomes] + [
            asdict(Outcome(s.name, s.title, "pending", detail="not reached"))
            for s in pending
        ]  # fmt: skip
        publish(result, work, out)

    try:
        if out is not None:
            progress([first, *rest])
        run(first, 0, rest)
        env = outcomes[0].data if outcomes[0].status == "passed" else {}
        result["environment"] = env
        out = out or _out_dir(None, env, args.cpu, started)
        progress(rest)
        # what really imports (a CuPy built for another CUDA is found but does not import)
        have.update({k: v is not None for k, v in env.get("modules", {}).items()})
        rest = [s for s in plan(work, args.cpu, have["matplotlib"], args.engram_params)
                if s.name in args.stages[1:]]  # fmt: skip
        for i, stage in enumerate(rest, start=1):
            run(stage, i, rest[i:])
            progress(rest[i:])
    except KeyboardInterrupt:
        print(stamp("interrupted"), flush=True)
        outcomes.append(Outcome("interrupted", "interrupted (Ctrl-C)", "failed"))
    code = exit_code(outcomes)
    result["status"] = {0: "passed", 1: "failed", 2: "incomplete"}[code]
    result["exit_code"] = code
    result["stages"] = [asdict(o) for o in outcomes]
    if out is None:
        out = _out_dir(args.out, {}, args.cpu, started)
    summary = publish(result, work, out)
    shutil.rmtree(work, ignore_errors=True)  # all of it is in the archive
    print(f"\n{result['status'].upper()}: wrote {', '.join(str(out / f) for f in FILES)}")
    print(f"see {summary}")
    return code


if __name__ == "__main__":
    sys.exit(main())
