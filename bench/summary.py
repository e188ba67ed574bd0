"""From what every path measured to the result's rows: medians with spreads, penalties and
their noise verdicts, roofline and GPU-busy fractions, the checks and what failed."""

from __future__ import annotations

from dataclasses import dataclass

from .roofline import roofline
from .run import PathBench, rss_bytes, step_figures
from .stats import penalty, rates, summarize
from .workload import Job


@dataclass
class Context:
    """What every row's figures are measured against."""

    ceiling_gbps: float | None  # the link ceiling (gathers' GB/s); None: no link (CPU)
    peak_gbps: float  # memory bandwidth (roofline)
    weight_bytes: int
    kv_bytes_per_token: int
    repeats: int


def phase_figures(b: PathBench, job: Job, phase: str, ctx: Context) -> dict:
    """Roofline and GPU busy of one phase, from its timed runs and its profiled run."""
    secs, steps = b.seconds[job.name][phase], b.steps[job.name].get(phase, [])
    runs = len(secs)
    median_s = summarize(secs)["median"]
    roof = roofline(
        len(steps) // runs,
        median_s,
        ctx.weight_bytes,
        job.kv_tokens_read(phase) * ctx.kv_bytes_per_token,
        sum(s.bytes for s in steps) / runs,
        ctx.peak_gbps,
    )
    kernel_s = b.busy.get(job.name, {}).get(phase)
    busy = None
    if kernel_s is not None and median_s > 0:
        busy = {"kernel_s": kernel_s, "fraction": kernel_s / median_s}
    return {"roofline": roof, "gpu_busy": busy}


def paper_figures(b: PathBench, job: Job, ctx: Context) -> dict:
    sec = b.seconds[job.name]
    pre, dec = sec["prefill"], sec["decode"]
    n_pre, n_dec = job.phase_tokens("prefill"), job.phase_tokens("decode")
    steps = b.steps[job.name]
    fig = lambda *phases: step_figures(
        [s for p in phases for s in steps.get(p, [])], ctx.ceiling_gbps, b.timed_gather
    )
    return {
        "prompt_tokens": n_pre,
        "decode_tokens": n_dec,
        "prefill_steps": b.prefill_steps[job.name],
        "decode_steps": job.timed_decode,
        "prefill_s": summarize(pre),
        "decode_s": summarize(dec),
        "prefill_tok_s": rates(n_pre, pre),
        "decode_tok_s": rates(n_dec, dec) if n_dec else None,
        "total_tok_s": summarize([(n_pre + n_dec) / (a + c) for a, c in zip(pre, dec)]),
        "prefill_hw": phase_figures(b, job, "prefill", ctx),
        "decode_hw": phase_figures(b, job, "decode", ctx) if n_dec else None,
        "all": fig("prefill", "decode"),
        "prefill": fig("prefill"),
        "decode": fig("decode"),
    }


def sweep_point(b: PathBench, job: Job, ctx: Context) -> dict:
    secs = b.seconds[job.name]["decode"]
    steps = b.steps[job.name].get("decode", [])
    return {
        "batch_size": len(job.prompts),
        "decode_s": summarize(secs),
        "tok_s": rates(job.phase_tokens("decode"), secs),
        **phase_figures(b, job, "decode", ctx),
        **step_figures(steps, ctx.ceiling_gbps, b.timed_gather),
    }


def own_gpu_peak(b: PathBench, benches: list[PathBench]) -> int | None:
    """GPU peak of the path's timed runs, less GPU tables held only for other paths."""
    if b.device.type != "cuda":
        return None
    others = {id(x.store): x.store for x in benches if x.store is not b.store}
    return b.gpu_peak - sum(s.bytes_by_tier().get("gpu", 0) for s in others.values())


def uva_grid(b: PathBench) -> dict | None:
    """The UVA path's persistent grid: what it measured beside compute and why it chose it."""
    grid = getattr(b.offloaded.prefetcher, "grid", None)
    return grid.as_dict() if grid is not None else None


def path_row(b: PathBench, benches: list[PathBench], jobs: list[Job], ctx: Context) -> dict:
    paper = next(j for j in jobs if j.name == "paper")
    return {
        "name": b.name,
        "placement": b.spec.placement,
        "gather": b.spec.gather,
        "dedup": b.spec.dedup,
        # the 'auto' path's measured staged/UVA switch
        "auto_crossover_rows": getattr(b.offloaded.prefetcher, "crossover", None),
        "uva_grid": uva_grid(b),
        "paper": paper_figures(b, paper, ctx),
        "sweep": [sweep_point(b, j, ctx) for j in jobs if j is not paper],
        "checks": {
            "rows": b.row_check.as_dict(),
            "tokens": b.tokens.as_dict(),
            "logits": b.logits.as_dict(),
        },
        "memory": {
            "gpu_max_allocated_bytes": own_gpu_peak(b, benches),
            "table_bytes_by_tier": b.store.bytes_by_tier(),
        },
    }


def add_penalties(rows: list[dict]) -> None:
    """Each figure's penalty against the baseline (row 0), judged against its spread."""
    base = rows[0]
    for r in rows:
        p, bp = r["paper"], base["paper"]
        p["penalty"] = {k: penalty(p[f"{k}_tok_s"], bp[f"{k}_tok_s"]) for k in PHASES}
        for s, bs in zip(r["sweep"], base["sweep"]):
            s["penalty"] = penalty(s["tok_s"], bs["tok_s"])


PHASES = ("prefill", "decode", "total")


def failures(rows: list[dict], deterministic: bool) -> list[str]:
    """One message per failed check: rows always, tokens in deterministic mode."""
    out, base = [], rows[0]["name"]
    for r in rows:
        rc, tc = r["checks"]["rows"], r["checks"]["tokens"]
        if not rc["ok"]:
            out.append(
                f"row '{r['name']}' handed the model Engram rows that differ from the resident "
                f"table: {rc['mismatched']} of {rc['rows']} rows in the checked steps "
                f"(first: {rc['first']})"
            )
        if deterministic and not tc["all_identical"]:
            whose = "its own first run" if r["name"] == base else f"the baseline '{base}'"
            out.append(
                f"row '{r['name']}' produced different greedy tokens than {whose} in "
                f"deterministic mode ({tc['first_difference']})"
            )
    return out


def build_rows(benches: list[PathBench], jobs: list[Job], ctx: Context) -> dict:
    rows = [path_row(b, benches, jobs, ctx) for b in benches]
    add_penalties(rows)
    return {"rows": rows, "host_rss_bytes": rss_bytes()}
