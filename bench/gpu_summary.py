"""The one-page ``summary.md`` of a ``bench/gpu-check`` run, from what its stages wrote.

Every figure is read from the run's own files (``environment.json``, ``startup.json``, each
``bench.json``); nothing here is measured or typed in.
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
    return [
        f"- {', '.join(vals) or 'environment unknown (its stage failed)'}",
        f"- commit {prov['commit']}{dirty}; `{prov['command']}`; {prov['date']}",
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
    ]


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


def write_summary(result: dict, out: Path) -> Path:
    """``summary.md`` in ``out``; returns its path."""
    env, prov = result.get("environment") or {}, result["provenance"]
    lines = [
        f"# bench/gpu-check: {result['status'].upper()} ({result['profile']})",
        "",
        *environment_lines(env, prov),
        f"- {result['seconds']:.0f} s of the {result['deadline_s']:.0f} s limit; exit status "
        f"{result['exit_code']} (0: every check ran and held, 1: a check failed, 2: some "
        "could not run)",
        "",
        "## Stages",
        *_table(
            ["stage", "status", "s", "result"],
            [
                [o["title"], o["status"], f"{o['seconds']:.0f}", o["detail"].replace("|", "/")]
                for o in result["stages"]
            ],
        ),  # fmt: skip
    ]
    for o in result["stages"]:
        data = o.get("data") or {}
        try:
            if o["name"] == "startup" and data:
                lines += startup_lines(data)
            elif o["name"].startswith("bench-") and data.get("bench"):
                res = json.loads((out / data["bench"]).read_text())
                lines += bench_lines(o["title"], res)
                lines += micro_lines(res.get("micro") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines += ["", f"({o['name']}: its results could not be summarised: {e})"]
    pngs = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    lines += ["", "Plots: " + (", ".join(pngs) if pngs else "none (matplotlib does not import)")]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
