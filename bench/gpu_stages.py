"""The in-process stages of ``bench/gpu-check``, each run in its own process by it:

    python -m bench.gpu_stages environment OUT_DIR [--cpu]
    python -m bench.gpu_stages startup OUT_DIR [--cpu]

``environment`` writes ``environment.json``: the device, driver and library versions, the
commit, which optional modules import. ``startup`` writes ``startup.json``: the built-in model
loaded as ``engram-serve`` loads it (CUDA, tables in pinned host memory, gather 'auto', dtype
'auto'), once as stored and once with fp8 rows, warmed up, then the start-up kernel check
(every check, not stopping at the first mismatch) with its cost, the tables' memory, the UVA
grid and ``auto``'s crossover. Exit status 1 when a check fails or the engine faulted (it
catches a failed step and keeps serving, so the fault is read from it, not raised). Each phase
prints a timestamped, flushed line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .phase import phase

# engram-bench's deterministic mode needs this before the process's first CUDA matmul
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

MODULES = (
    "torch", "numpy", "triton", "cupy", "safetensors", "tokenizers", "tqdm", "pytest",
    "matplotlib", "hypothesis", "fastapi", "uvicorn", "httpx", "openai",
)  # fmt: skip
CHECK_TARGET_S = 1.0  # the start-up check's cost target, once the kernels are compiled


def module_versions() -> dict[str, str | None]:
    """Each module's version, "importable" without one, or None where it does not import."""
    out = {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            out[name] = None
            continue
        out[name] = str(getattr(mod, "__version__", "importable"))
    return out


def environment(out: Path, cpu: bool) -> int:
    import torch

    from .provenance import environment as env

    device = torch.device("cpu" if cpu else "cuda")
    info = {"cuda_available": torch.cuda.is_available(), "modules": module_versions()}
    if device.type == "cuda" and not torch.cuda.is_available():
        info.update(device=None, error="torch sees no CUDA device (a CPU build of torch?)")
        (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
        return 1
    info.update(env(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sms=props.multi_processor_count, memory_bytes=props.total_memory)
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


def _fault(engine) -> str | None:
    e = engine.fault
    return f"{type(e).__name__}: {e}" if e is not None else None


def warm_up(engine) -> tuple[float, str | None]:
    """The server's warm-up, one short greedy request: (seconds, what went wrong or None). The
    engine catches a failed step and keeps serving, so its fault is read, not raised."""
    from engine.sampling import SamplingParams

    t = time.perf_counter()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    (seq,) = engine.add("warm-up", [1 + i % 100 for i in range(8)], params)
    engine.run_until_done()
    seconds = time.perf_counter() - t
    fault = _fault(engine)
    if fault is None and len(seq.output_ids) != params.max_tokens:
        fault = f"the warm-up request ended with {len(seq.output_ids)} of 3 tokens"
    return seconds, fault


def _load_and_check(row_format: str, cpu: bool) -> dict:
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.kernel_check import check_kernels
    from offload.offloaded_model import OffloadedModel

    phase(f"{row_format} rows: loading the built-in model")
    t0 = time.perf_counter()
    om = OffloadedModel.load(device="cpu" if cpu else "cuda", row_format=row_format, progress=False)
    try:
        # 'triton' on the CPU dry run: the kernels in Triton's interpreter, through the same check
        cfg = EngineConfig(attention="triton" if cpu else "auto")
        engine = Engine(om.model, cfg, rows=om.prefetcher, tokenizer=om.tokenizer)
        load_s = time.perf_counter() - t0
        phase(f"{row_format} rows: loaded in {load_s:.1f} s ({om.gather}); warming up")
        warm_s, warm_fault = warm_up(engine)
        phase(f"{row_format} rows: warm-up {warm_s:.1f} s; checking the kernels")
        t = time.perf_counter()
        checked = check_kernels(engine, strict=False)
        check_s = time.perf_counter() - t
        phase(f"{row_format} rows: check {check_s:.2f} s")
        fault = warm_fault or _fault(engine)  # the check's own steps can fault too
        grid = getattr(om.prefetcher, "grid", None)
        measured = getattr(om.prefetcher, "measured", None)
        return {
            "row_format": row_format,
            "device": str(om.device),
            "dtype": str(om.dtype),
            "placement": om.placement.value,
            "gather": om.gather,
            "graphs": engine.runner.graphs is not None and bool(engine.runner.graphs.capture),
            "load_s": load_s,
            "warm_up_s": warm_s,
            "check_s": check_s,
            "check_under_target": check_s < CHECK_TARGET_S,
            "memory": om.store.describe(),
            "grid": grid.as_dict() if grid is not None else None,
            "crossover_rows": getattr(om.prefetcher, "crossover", None),
            "gathers_measured": measured,
            "checks": [{**asdict(c), "ok": c.ok} for c in checked],
            "fault": fault,
            "ok": fault is None and all(c.ok for c in checked),
        }
    finally:
        om.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def startup(out: Path, cpu: bool) -> int:
    runs = []
    for row_format in ("auto", "fp8"):
        try:
            runs.append(_load_and_check(row_format, cpu))
        except Exception as e:  # the next row format still runs; the summary says why
            phase(f"{row_format} rows: {type(e).__name__}: {e}")
            runs.append(
                {"row_format": row_format, "ok": False, "error": f"{type(e).__name__}: {e}"}
            )
    result = {"target_s": CHECK_TARGET_S, "runs": runs, "ok": all(r["ok"] for r in runs)}
    (out / "startup.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    for r in runs:
        line = r.get("error") or ", ".join(
            f"{c['kernel']} {'ok' if c['ok'] else 'FAILED'} ({c['error']:.3g})" for c in r["checks"]
        )
        fault = f"; engine fault: {r['fault']}" if r.get("fault") else ""
        print(f"{r['row_format']}: {line}{fault}", flush=True)
    return 0 if result["ok"] else 1


STAGES = {"environment": environment, "startup": startup}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in STAGES:
        print(f"usage: python -m bench.gpu_stages {{{','.join(STAGES)}}} OUT_DIR [--cpu]")
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    phase(f"{argv[0]}: start")
    rc = STAGES[argv[0]](out, "--cpu" in argv[2:])
    phase(f"{argv[0]}: done, exit status {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
