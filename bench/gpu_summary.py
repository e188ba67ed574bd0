"""The one-page ``summary.md`` of a ``bench/gpu-check`` run, from what its stages wrote.

Every figure is read from the run's own files (``environment.json``, ``startup.json``, each
``bench.json``, in the run's working folder, which ``gpu-check.tar.gz`` holds); nothing here
is measured or typed in. Written after every stage, so a page of a run that was stopped says
so.
"""

from __future__ import annotations

import json
from pathlib import Path

MICRO_ROWS = 1 << 20  # the microbenchmark row count the page shows (the largest measured)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _med(s: dict | None, spec: str = ".0f") -> str:
    if not s or s.get("median") is None:
        return "-"
    spread = s.get("spread_pct")
    return format(s["median"], spec) + (f" (+-{spread:.0f}%)" if spread is not None else "")


def _pen(p: dict | None) -> str:
    if not p or p.get("pct") is None:
        return "-"
    if p["verdict"] == "within noise":
        return f"noise (+-{p['noise_pct']:.1f}%)"
    return f"{p['pct']:+.1f}%" + ("*" if p["verdict"] == "no noise estimate" else "")


def environment_lines(env: dict, prov: dict) -> list[str]:
    keys = ("device", "nvidia_driver", "cuda_driver", "torch", "torch_cuda", "triton", "cupy",
            "numpy", "python")  # fmt: skip
    vals = [f"{k} {env[k]}" for k in keys if env.get(k)]
    dirty = " (uncommitted changes)" if prov.get("dirty") else ""
    source = (
        f" (from {prov['commit_from']})" if prov.get("commit_from") not in (None, "git") else ""
    )
    return [
        f"- {', '.join(vals) or 'environment unknown (its stage failed)'}",
        f"- commit {prov['commit']}{dirty}{source}; `{prov['command']}`; {prov['date']}",
    ]


def startup_lines(res: dict) -> list[str]:
    rows = []
    for r in res.get("runs", []):
        if "error" in r:
            rows.append([r["row_format"], "(load failed)", r["error"][:80], "", "FAILED"])
            continue
        for c in r["checks"]:
            ok = "held" if c["ok"] else "FAILED"
            rows.append([r["row_format"], c["kernel"], f"{c['error']:.3g}", f"{c['tolerance']:.3g}",
                         ok])  # fmt: skip
    costs = [
        f"{r['row_format']} {r['check_s']:.2f} s" for r in res.get("runs", []) if "check_s" in r
    ]
    target = res.get("target_s", 1.0)
    return [
        "",
        "## Start-up kernel check",
        *_table(["rows", "kernel", "max error", "tolerance", ""], rows),
        f"Cost after warm-up: {', '.join(costs) or '-'} (target < {target:g} s).",
        *(line for r in res.get("runs", []) for line in _startup_run(r)),
    ]


def _startup_run(r: dict) -> list[str]:
    """What one loaded model ran on: its tables' memory, the UVA grid, auto's crossover."""
    if "error" in r:
        return []
    mem = r.get("memory") or {}
    line = (
        f"- {r['row_format']} rows: {r['gather']} gather, tables {r.get('placement')} in "
        f"{'/'.join(mem.get('memory', [])) or '?'} memory"
        + (", registered" if mem.get("registered") else "")
        + f"; load {r['load_s']:.1f} s, warm-up {r['warm_up_s']:.1f} s"
    )
    if r.get("gather") == "auto":
        c = r.get("crossover_rows")
        line += f"; auto: {'UVA at every size' if c is None else f'staged from {c} rows'}"
    g = r.get("grid")
    out = [line]
    if g:
        out.append(f"  - UVA grid {g['programs']} programs of {g['sms']} SMs: {g['why']}")
    if r.get("fault"):
        out.append(f"  - ENGINE FAULT: {r['fault']}")
    return out


def bench_lines(title: str, res: dict) -> list[str]:
    rows = res["rows"]
    paper = [
        [r["name"], _med(r["paper"]["prefill_tok_s"]), _med(r["paper"]["decode_tok_s"]),
         _pen(r["paper"]["penalty"]["decode"]),
         "yes" if r["checks"]["rows"]["ok"] else "NO",
         "yes" if r["checks"]["tokens"]["all_identical"] else "NO"]
        for r in rows
    ]  # fmt: skip
    sizes = [s["batch_size"] for s in rows[0]["sweep"]]
    sweep = [
        [r["name"], *(f"{_med(s['tok_s'])} {_pen(s.get('penalty'))}" for s in r["sweep"])]
        for r in rows
    ]
    wl = res["workload"]
    out = [
        "",
        f"## {title}",
        f"{res['model']['description']}, {res['model']['dtype']}; paper workload: "
        f"{wl['num_seqs']} prompts of {wl['prompt_len'][0]}-{wl['prompt_len'][1]} tokens, "
        f"{wl['decode_tokens']} decode steps, {wl['repeats']} rounds (median, spread; "
        "penalty vs the resident row).",
        *_table(
            ["path", "prefill tok/s", "decode tok/s", "decode penalty", "rows same", "tokens same"],
            paper,
        ),  # fmt: skip
    ]
    if sizes:
        out += ["", "Decode sweep, tok/s and penalty:"]
        out += _table(["path", *(f"B={b}" for b in sizes)], sweep)
    for r in rows:
        g = r.get("uva_grid")
        if g:
            out.append(f"- {r['name']} UVA grid: {g['programs']} programs of {g['sms']} SMs "
                       f"(bound {g['bound']}): {g['why']}")  # fmt: skip
    return out + [f"- failed: {m}" for m in res["failures"]]


def micro_lines(micro: dict) -> list[str]:
    rows = micro.get("rows") or []
    if not rows:
        return []
    top = max(r["rows"] for r in rows)
    paths = micro["paths"]
    body = [
        [r["format"], str(r["row_bytes"]), str(r["rows"]),
         *(f"{r[f'{p}_gbps']:.1f}" for p in paths)]
        for r in rows if r["rows"] == min(top, MICRO_ROWS)
    ]  # fmt: skip
    cross = micro.get("crossover_rows") or {}
    return [
        "",
        f"## Gather microbenchmark ({min(top, MICRO_ROWS)} random rows, GB/s)",
        *_table(["format", "row B", "rows", *paths], body),
        *(f"- crossover {k}: {'UVA at every size' if v is None else f'staged from {v} rows'}"
          for k, v in cross.items()),
    ]  # fmt: skip


def _stage_rows(stages: list[dict]) -> list[list[str]]:
    return [
        [o["title"], o["status"], f"{o['seconds']:.0f}" + (f"/{o['budget_s']:.0f}"
         if o.get("budget_s") else ""), o["detail"].replace("|", "/")[:400]]
        for o in stages
    ]  # fmt: skip


def _stderr_lines(stages: list[dict]) -> list[str]:
    """The last lines of stderr of each stage that did not pass (the reason a run shows)."""
    out = []
    for o in stages:
        if o.get("stderr_tail") and o["status"] not in ("passed", "pending"):
            out += ["", f"stderr of {o['name']} (last lines):", "```", o["stderr_tail"], "```"]
    return out


def render(result: dict, work: Path) -> str:
    """The page, from ``result`` and the stages' files under ``work``."""
    env, prov = result.get("environment") or {}, result["provenance"]
    status = result["status"].upper()
    if result["status"] == "running":
        done = sum(o["status"] != "pending" for o in result["stages"])
        status += (f" (written after stage {done} of {len(result['stages'])}; as the last "
                   "page of a run, it was stopped in the next)")  # fmt: skip
    code = result.get("exit_code")
    lines = [
        f"# bench/gpu-check: {status} ({result['profile']})",
        "",
        *environment_lines(env, prov),
        f"- {result['seconds']:.0f} s of the {result['deadline_s']:.0f} s limit; exit status "
        f"{'-' if code is None else code} (0: every check ran and held, 1: a check failed, "
        "2: some could not run)",
        "",
        "## Stages (s: taken/budget)",
        *_table(["stage", "status", "s", "result"], _stage_rows(result["stages"])),
        *_stderr_lines(result["stages"]),
    ]
    for o in result["stages"]:
        data = o.get("data") or {}
        try:
            if o["name"] == "startup" and data:
                lines += startup_lines(data)
            elif o["name"].startswith("bench-") and data.get("bench"):
                res = json.loads((work / data["bench"]).read_text())
                lines += bench_lines(o["title"], res)
                lines += micro_lines(res.get("micro") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines += ["", f"({o['name']}: its results could not be summarised: {e})"]
    pngs = sorted(str(p.relative_to(work)) for p in work.rglob("*.png"))
    lines += ["", "In gpu-check.tar.gz: logs/ (each stage's stdout and stderr), each stage's JSON"
              + (f"; plots: {', '.join(pngs)}" if pngs else "; no plots")]  # fmt: skip
    return "\n".join(lines) + "\n"
