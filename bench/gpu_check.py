"""``bench/gpu-check``: the first thing to run on a GPU machine, one command, under 8 minutes.

Stages, each in its own process with its own time cap, inside one overall deadline (a stage
that fails, crashes or runs out of time never stops the next ones, and the summary is always
written):

1. environment: device, driver, versions, commit, which optional modules import;
2. start-up kernel check: the built-in model loaded as the server loads it (as stored and fp8
   rows), warmed up, every kernel against its reference, and what the check costs;
3. the gpu-marked tests, through pytest when it imports (said so when it does not);
4. engram-bench on the built-in model: the paper workload, resident vs host (uva and staged),
   with repeats, a short decode sweep, and the gather microbenchmark;
5. engram-bench on the synthetic dense-4b-like model: the paper workload and the B=1/64/256
   decode sweep, resident vs host (uva and staged), with repeats.

Everything lands in ``bench/results/<date>-<gpu>/``: ``gpu-check.json`` (every stage, the
provenance), ``summary.md`` (one page), each stage's log and outputs (engram-bench's
``bench.json`` and PNGs, when matplotlib imports). Exit status: 0 every check ran and held,
1 a check failed (or crashed, or ran out of time), 2 none failed but some could not run.

``--cpu`` is a dry run of the same stages and code on a CPU, with CPU-sized workloads (the
attention kernels in Triton's interpreter): the tests run it. This module imports only the
standard library, so it reports a broken torch instead of dying with it.
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
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 450.0  # the summary is written by 7.5 minutes
RESERVE_S = 15.0  # kept back from the last stage for the summary
NEEDED = ("torch", "numpy", "safetensors", "tokenizers", "tqdm")
MISSING_HINT = (
    "pip install them; without network, `pip install --target DIR ...` where there is one, "
    "copy DIR here and run PYTHONPATH=DIR bench/gpu-check"
)

# engram-bench arguments per profile: (built-in model, dense-4b-like)
BENCH = {
    "gpu": (
        ["--device", "cuda", "--placement", "host", "--gathers", "uva,staged", "--dedup", "off",
         "--repeats", "3", "--num-seqs", "32", "--decode-tokens", "32", "--batch-sizes", "1,64",
         "--sweep-steps", "16", "--micro-rows", "4096,65536,1048576"],
        ["--device", "cuda", "--synthetic", "dense-4b-like", "--engram-params", "5e9",
         "--placement", "host", "--gathers", "uva,staged", "--dedup", "off", "--repeats", "3",
         "--num-seqs", "32", "--decode-tokens", "32", "--batch-sizes", "1,64,256",
         "--sweep-steps", "16", "--no-micro"],
    ),
    "cpu": (
        ["--device", "cpu", "--quick", "--dedup", "off", "--repeats", "2", "--num-seqs", "2",
         "--decode-tokens", "2", "--prompt-len", "8,16", "--batch-sizes", "1",
         "--sweep-steps", "2", "--micro-rows", "1024", "--micro-repeats", "1"],
        ["--device", "cpu", "--synthetic", "dense-4b-like", "--layers", "2", "--engram-params",
         "1e5", "--quick", "--dedup", "off", "--repeats", "1", "--num-seqs", "1",
         "--decode-tokens", "2", "--prompt-len", "8,16", "--batch-sizes", "1",
         "--sweep-steps", "2", "--no-micro"],
    ),
}  # fmt: skip
CAPS = {"environment": 90, "startup": 120, "tests": 150, "bench-builtin": 90, "bench-4b": 240}
TEST_FILES = {"gpu": ["tests"], "cpu": ["tests/test_kernel_check.py", "tests/test_grid.py"]}
WEB_STACK = ("fastapi", "uvicorn", "httpx", "openai", "hypothesis", "yaml", "schemathesis")
PROJECT = ("engine", "models", "offload", "bench", "server", "training", "tests")


@dataclass
class Stage:
    name: str
    title: str
    argv: list[str]
    read: Callable[[Path, int], tuple[str, str, dict]]  # (status, one line, data)
    needs: tuple[str, ...] = NEEDED
    env: dict[str, str] = field(default_factory=dict)
    min_s: float = 15.0
    partial: Callable[[Path], str] | None = None  # what a stage that ran out of time got done


@dataclass
class Outcome:
    name: str
    title: str
    status: str  # passed | failed | timed out | not run
    seconds: float = 0.0
    detail: str = ""
    log: str | None = None
    data: dict = field(default_factory=dict)


# --- reading what each stage left -------------------------------------------------------------
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_environment(out: Path, rc: int) -> tuple[str, str, dict]:
    env = _json(out / "environment.json")
    if rc != 0:
        return "failed", env.get("error", f"exit status {rc}"), env
    line = f"{env['device']}, torch {env['torch']}, triton {env.get('triton')}"
    return "passed", line, env


def read_startup(out: Path, rc: int) -> tuple[str, str, dict]:
    res = _json(out / "startup.json")
    parts = []
    for r in res["runs"]:
        if "error" in r:
            parts.append(f"{r['row_format']} rows: {r['error']}")
            continue
        bad = [c["kernel"] for c in r["checks"] if not c["ok"]]
        held = f"{len(r['checks']) - len(bad)}/{len(r['checks'])} held"
        parts.append(
            f"{r['row_format']} rows ({r['dtype']}, {r['gather']}): {held}"
            + (f", FAILED: {'; '.join(bad)}" if bad else "")
            + f", check {r['check_s']:.2f} s"
        )
    return ("passed" if res["ok"] and rc == 0 else "failed"), "; ".join(parts), res


def read_tests(cpu: bool) -> Callable[[Path, int], tuple[str, str, dict]]:
    return lambda out, rc: _read_tests(out, rc, cpu)


def _read_tests(out: Path, rc: int, cpu: bool) -> tuple[str, str, dict]:
    xml = out / "gpu-tests.xml"
    if not xml.is_file():  # e.g. a crash inside CUDA took pytest down
        why = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        return (
            "failed",
            f"pytest ended ({why}) without a report: " + tests_so_far(out / "logs" / "tests.log"),
            {},
        )
    root = ET.parse(xml).getroot()
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "not collected": 0}
    failed, missing = [], set()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            text = (bad.get("message") or "") + (bad.text or "")
            needs = re.findall(r"No module named '([\w.]+)'", text)
            if needs and needs[0].split(".")[0] not in PROJECT:  # a package this machine lacks
                counts["not collected"] += 1
                missing.add(needs[0].split(".")[0])
                continue
            counts["failed" if bad.tag == "failure" else "error"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    line = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
    if missing:
        line += f" (files that import {', '.join(sorted(missing))}, absent here)"
    data = {"counts": counts, "failed": failed, "not_collected_for": sorted(missing)}
    bad = counts["failed"] + counts["error"]
    # on a CPU every gpu test skips: the dry run checks the machinery, not the tests
    status = "failed" if bad else "passed" if counts["passed"] or cpu else "not run"
    return status, line + (f"; failed: {', '.join(failed[:5])}" if failed else ""), data


def tests_so_far(log: Path) -> str:
    """Outcomes pytest -v printed before it was stopped."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    got = {k: len(re.findall(rf"::\S+ {k.upper()}", text)) for k in ("passed", "failed", "skipped")}
    failed = re.findall(r"^(\S+::\S+) FAILED", text, re.M)
    line = ", ".join(f"{v} {k}" for k, v in got.items()) + " before it stopped"
    return line + (f"; failed: {', '.join(failed[:5])}" if failed else "")


def read_bench(name: str) -> Callable[[Path, int], tuple[str, str, dict]]:
    def read(out: Path, rc: int) -> tuple[str, str, dict]:
        res = _json(out / name / "bench.json")
        rows = res["rows"]
        base = rows[0]["name"]
        parts = [
            "rows identical" if res["rows_identical"] else "ROWS DIFFER",
            "tokens identical" if res["tokens_identical"] else "TOKENS DIFFER",
        ]
        for r in rows[1:]:
            p = r["paper"]["penalty"]["decode"]
            if p["pct"] is not None:
                parts.append(f"{r['name']} decode {p['pct']:+.1f}% vs {base} ({p['verdict']})")
        status = "passed" if rc == 0 and not res["failures"] else "failed"
        return status, "; ".join(parts + res["failures"][:3]), {"bench": f"{name}/bench.json"}

    return read


# --- the plan ---------------------------------------------------------------------------------
def plan(out: Path, cpu: bool, plots: bool, engram_params: str | None) -> list[Stage]:
    py, profile = sys.executable, "cpu" if cpu else "gpu"
    flag = ["--cpu"] if cpu else []
    builtin, dense = (list(a) for a in BENCH[profile])
    if engram_params:
        dense[dense.index("--engram-params") + 1] = engram_params
    no_plots = [] if plots else ["--no-plots"]
    interp = {"TRITON_INTERPRET": "1"} if cpu else {}
    junit = ["--junitxml", str(out / "gpu-tests.xml"), "-o", "junit_family=xunit1"]
    pytest = [py, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", *junit]
    pytest += ["--continue-on-collection-errors", *TEST_FILES[profile]]
    bench = [py, "-m", "bench.cli"]
    gpu = () if cpu else ("cupy",)
    return [
        Stage("environment", "environment and versions",
              [py, "-m", "bench.gpu_stages", "environment", str(out), *flag], read_environment,
              needs=("torch", "numpy")),
        Stage("startup", "start-up kernel check (built-in model, as stored and fp8 rows)",
              [py, "-m", "bench.gpu_stages", "startup", str(out), *flag], read_startup,
              needs=(*NEEDED, "triton"), env=interp),
        Stage("tests", "gpu-marked tests (pytest -m gpu)", pytest, read_tests(cpu),
              needs=(*NEEDED, "pytest"), partial=tests_so_far),
        Stage("bench-builtin", "engram-bench, built-in model (+ gather microbenchmark)",
              [*bench, *builtin, *no_plots, "--out", str(out / "builtin")],
              read_bench("builtin"), needs=(*NEEDED, *gpu)),
        Stage("bench-4b", "engram-bench, synthetic dense-4b-like (paper workload, decode sweep)",
              [*bench, *dense, *no_plots, "--out", str(out / "dense-4b-like")],
              read_bench("dense-4b-like"), needs=(*NEEDED, *gpu)),
    ]  # fmt: skip


# --- running it -------------------------------------------------------------------------------
def _last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def run_stage(stage: Stage, out: Path, deadline: float, have: dict[str, bool]) -> Outcome:
    o = Outcome(stage.name, stage.title, "not run")
    missing = [m for m in stage.needs if not have.get(m)]
    if missing:
        o.detail = f"needs {', '.join(missing)}, which do not import here: {MISSING_HINT}"
        return o
    budget = min(CAPS.get(stage.name, DEADLINE_S), deadline - time.monotonic())
    if budget < stage.min_s:
        o.detail = f"out of time: {max(0.0, budget):.0f} s left of the overall limit"
        return o
    log = out / "logs" / f"{stage.name}.log"
    o.log = str(log.relative_to(out))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, **stage.env}
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(stage.argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            stage.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=budget)
        except KeyboardInterrupt:  # the stage runs in its own session: stop it too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # SIGKILL: a CUDA process torn down mid-load
            proc.wait()  # by SIGTERM has segfaulted; nothing of it is kept but its log
            o.seconds = time.monotonic() - t0
            o.status = "timed out"
            done = stage.partial(log) if stage.partial else f"last: {_last_line(log)}"
            o.detail = f"stopped after {budget:.0f} s (cap {CAPS.get(stage.name)} s); {done}"
            return o
    o.seconds = time.monotonic() - t0
    try:
        o.status, o.detail, o.data = stage.read(out, rc)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
        o.status = "failed"
        why = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        o.detail = f"{why}, no result ({type(e).__name__}: {e}); last: {_last_line(log)}"
    return o


def exit_code(outcomes: list[Outcome]) -> int:
    if any(o.status in ("failed", "timed out") for o in outcomes):
        return 1
    return 2 if any(o.status == "not run" for o in outcomes) else 0


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def provenance(command: str, started: dt.datetime) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(status) if status is not None else None,
        "python": sys.version.split()[0],
        "executable": sys.executable,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "gpu"


def main(argv: list[str] | None = None) -> int:
    from .gpu_summary import write_summary

    ap = argparse.ArgumentParser(prog="bench/gpu-check", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run of every stage on a CPU")
    ap.add_argument("--out", default=None, help="default: bench/results/<date>-<gpu>")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="overall limit")
    ap.add_argument("--engram-params", default=None, help="dense-4b-like table parameters")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    start, started = time.monotonic(), dt.datetime.now().astimezone()
    deadline = start + args.deadline_s - RESERVE_S
    command = shlex.join(["bench/gpu-check", *(sys.argv[1:] if argv is None else argv)])
    have = {m: importlib.util.find_spec(m) is not None for m in (*NEEDED, *WEB_STACK, "triton",
            "cupy", "pytest", "matplotlib")}  # fmt: skip
    # the environment stage first, into a scratch folder named once the GPU is known
    scratch = REPO / "bench" / "results" / f".gpu-check-{os.getpid()}"
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    first = plan(scratch, args.cpu, False, args.engram_params)[0]
    print(f"[1/5] {first.title} ...", flush=True)
    outcomes = [run_stage(first, scratch, deadline, have)]
    print(f"      {outcomes[0].status} ({outcomes[0].seconds:.0f} s): {outcomes[0].detail}")
    env = outcomes[0].data if outcomes[0].status == "passed" else {}
    # what really imports (a CuPy built for another CUDA is found but does not import)
    have.update({k: v is not None for k, v in env.get("modules", {}).items()})
    name = "cpu" if args.cpu else _slug(env.get("device") or "unknown-gpu")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"{started:%Y-%m-%d}-{name}"
    if out.exists() and any(out.iterdir()):
        out = out.with_name(f"{out.name}-{started:%H%M%S}")
    if out.exists():
        out.rmdir()  # empty
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch), str(out))
    stages = plan(out, args.cpu, have["matplotlib"], args.engram_params)
    for i, stage in enumerate(stages[1:], start=2):
        print(f"[{i}/{len(stages)}] {stage.title} ...", flush=True)
        o = run_stage(stage, out, deadline, have)
        outcomes.append(o)
        print(f"      {o.status} ({o.seconds:.0f} s): {o.detail}", flush=True)
    code = exit_code(outcomes)
    result = {
        "status": {0: "passed", 1: "failed", 2: "incomplete"}[code],
        "exit_code": code,
        "profile": "cpu dry run" if args.cpu else "gpu",
        "provenance": provenance(command, started),
        "environment": env,
        "modules": have,
        "deadline_s": args.deadline_s,
        "seconds": time.monotonic() - start,
        "stages": [asdict(o) for o in outcomes],
    }
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = write_summary(result, out)
    print(f"\n{result['status'].upper()}: wrote {out / 'gpu-check.json'} and {summary}")
    return code


if __name__ == "__main__":
    sys.exit(main())
