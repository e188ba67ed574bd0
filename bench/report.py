"""What ``engram-bench`` prints: text tables of a result.

``report`` reads only the result dict (the same one written to ``bench.json``), so a saved
result can be printed again.
"""

from __future__ import annotations

import re

from .stats import fmt_penalty, fmt_spread

PROG = "engram-bench"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


# --- formatting ------------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def penalty_cell(p: dict, is_base: bool) -> str:
    """The baseline shows its own spread (the noise others are judged against)."""
    if is_base:
        noise = p["noise_pct"]
        return "baseline" + ("" if noise is None else f" (+-{noise:.1f}%)")
    return fmt_penalty(p)


def busy_cell(hw: dict | None) -> str:
    return "n/a" if hw is None or hw["gpu_busy"] is None else fmt_pct(hw["gpu_busy"]["fraction"])


def roof_cell(hw: dict | None) -> str:
    return "-" if hw is None else fmt_pct(hw["roofline"]["fraction_of_peak"])


def has_link(res: dict) -> bool:
    """Whether the tables reach compute over a link (CUDA); results from before the "link"
    field was written say it with their device."""
    return res["ceiling"].get("link", res["environment"]["device_type"] == "cuda")


def link_line(res: dict) -> str:
    """The link ceiling, or on a CPU (no link) the memcpy figure as what it is: a reference."""
    ceil = res["ceiling"]
    size = fmt_bytes(ceil["bytes"])
    if has_link(res):
        return f"link ceiling: {ceil['gbps']:.2f} GB/s ({ceil['label']}, {size})"
    return (
        f"link ceiling: none (no link on CPU); {ceil['label']}: {ceil['gbps']:.2f} GB/s over "
        f"{size}, for reference (gathers that stay in cache run faster)"
    )


def gbps_cell(gbps: float, fraction: float | None) -> str:
    """GB/s, with the share of the link ceiling where there is one."""
    return f"{gbps:.2f}" if fraction is None else f"{gbps:.2f} ({100 * fraction:.0f}%)"


# --- the report, one section per table -------------------------------------------------------
def header(res: dict) -> list[str]:
    env, wl, mem = res["environment"], res["workload"], res["memory_bandwidth"]
    det = "on" if res["deterministic"]["enabled"] else "off"
    commit = env.get("commit", "unknown")
    if env.get("dirty"):
        commit += " (uncommitted changes)"
    return [
        f"{PROG}: {res['model']['description']} on {env['device']}",
        f"commit {commit}; torch {env['torch']}; deterministic mode {det}",
        link_line(res),
        f"peak memory bandwidth: {mem['gbps']:.2f} GB/s ({mem['label']}, "
        f"{fmt_bytes(mem['bytes'])})",
        f"every path ran every job once untimed (warm-up), then {wl['repeats']} interleaved "
        "round(s) in rotated order; figures: median (min-max) over the rounds",
    ]


def paper_section(rows: list[dict], wl: dict, link: bool = True) -> list[str]:
    lo, hi = wl["prompt_len"]
    speed, hw = [], []
    for r in rows:
        p, a, is_base = r["paper"], r["paper"]["all"], r is rows[0]
        pen = p["penalty"]
        speed.append(
            [
                r["name"],
                fmt_spread(p["prefill_tok_s"]),
                penalty_cell(pen["prefill"], is_base),
                fmt_spread(p["decode_tok_s"]),
                penalty_cell(pen["decode"], is_base),
            ]
        )
        dec = p["decode_hw"]
        hw.append(
            [
                r["name"],
                fmt_bytes(dec["roofline"]["bytes_per_step"]) if dec else "-",
                roof_cell(p["prefill_hw"]) + " / " + roof_cell(dec),
                busy_cell(p["prefill_hw"]) + " / " + busy_cell(dec),
                fmt(a["stall_ms_per_step_per_layer"], ".3f"),
                fmt_bytes(a["bytes_per_step"]),
                fmt(a["gbps"], ".2f"),
                fmt_pct(a["fraction_of_ceiling"]) if link else "n/a",  # no link on a CPU
            ]
        )
    heads = ["path", "prefill tok/s", "prefill penalty", "decode tok/s", "decode penalty"]
    hw_heads = [
        "path",
        "decode bytes/step",
        "% peak BW pre/dec",
        "GPU busy pre/dec",
        "stall ms/step/layer",
        "Engram bytes/step",
        "gather GB/s",
        "% link",
    ]
    return [
        "",
        f"paper workload: {wl['num_seqs']} sequences, prompts Uniform({lo}, {hi}), "
        f"{wl['decode_tokens']} decode tokens each, {wl['max_batched_tokens']} tokens/step budget",
        table(heads, speed),
        "",
        "paper workload, how close to the hardware (bytes a step must read: weights + KV "
        "context + Engram rows)",
        table(hw_heads, hw),
    ]


def sweep_section(rows: list[dict], wl: dict) -> list[str]:
    if not rows or not rows[0]["sweep"]:
        return []
    body = []
    for k in range(len(rows[0]["sweep"])):
        for r in rows:
            s = r["sweep"][k]
            body.append(
                [
                    r["name"],
                    str(s["batch_size"]),
                    fmt_spread(s["tok_s"]),
                    penalty_cell(s["penalty"], r is rows[0]),
                    fmt_pct(s["roofline"]["fraction_of_peak"]),
                    busy_cell(s),
                    fmt(s["stall_ms_per_step_per_layer"], ".3f"),
                ]
            )
    heads = [
        "path",
        "batch",
        "decode tok/s",
        "penalty",
        "% peak BW",
        "GPU busy",
        "stall ms/step/layer",
    ]
    return [
        "",
        f"decode batch sweep: {wl['sweep_steps']} timed steps after {wl['sweep_warmup']} untimed",
        table(heads, body),
    ]


def checks_section(rows: list[dict], deterministic: bool) -> list[str]:
    body = []
    for r in rows:
        c = r["checks"]
        rc, tc, lc = c["rows"], c["tokens"], c["logits"]
        rows_cell = f"{rc['rows'] - rc['mismatched']}/{rc['rows']} identical"
        if tc["all_identical"]:
            tok = f"identical ({tc['runs']} runs)"
        else:
            tok = f"{fmt_pct(tc['identical_share'])} identical ({tc['runs']} runs)"
        logit = "reference" if r is rows[0] else fmt(lc["max_abs_diff"], ".3g")
        body.append([r["name"], rows_cell, tok, logit])
    need = "must be identical" if deterministic else "share reported (not deterministic mode)"
    return [
        "",
        f"checks against the baseline (rows: first steps of every job, bit for bit; tokens: "
        f"every run, {need}; logits: max |difference|, first steps)",
        table(["path", "Engram rows", "greedy tokens", "logits"], body),
    ]


def memory_section(res: dict) -> list[str]:
    rows = res["rows"]
    body = []
    for r in rows:
        m = r["memory"]
        tiers = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m["table_bytes_by_tier"].items() if v)
        body.append([r["name"], fmt_bytes(m["gpu_max_allocated_bytes"]), tiers or "-"])
    return [
        "",
        f"memory (host RSS of the whole process: {fmt_bytes(res.get('host_rss_bytes'))})",
        table(["path", "GPU max allocated", "Engram tables"], body),
    ]


def grid_section(rows: list[dict]) -> list[str]:
    """Per UVA path: the persistent grid it chose beside compute, and why."""
    out = []
    for r in rows:
        g = r.get("uva_grid")
        if not g:
            continue
        steps = ", ".join(f"{p}: {s * 1e3:.3f}" for p, s in g["step_s"].items())
        out.append(
            f"{r['name']}: {g['programs']} programs (at most {g['bound']} of {g['sms']} SMs); "
            f"step beside compute, ms by grid: {steps}; {g['why']}"
        )
    if not out:
        return []
    return ["", "UVA gather grid (chosen at start-up with compute running beside it)", *out]


def notes(res: dict) -> list[str]:
    out = []
    if res["workload"]["repeats"] < 2:
        out.append("*: one round, so no noise estimate; --repeats 3 gives one")
    if res["environment"]["device_type"] != "cuda":
        out.append("GPU busy: n/a on CPU; % peak BW is against the measured host memcpy")
    return [""] + out if out else []


def micro_section(micro: dict, device_type: str) -> list[str]:
    link = device_type == "cuda"
    if not micro.get("rows"):
        skipped = micro.get("skipped")
        return ["", f"gather microbenchmark skipped: {skipped}"] if skipped else []
    paths = micro["paths"]
    body = [
        [m.get("format", "-"), str(m.get("row_bytes", "-")), str(m["rows"]), fmt_bytes(m["bytes"])]
        + [
            gbps_cell(m[f"{p}_gbps"], m[f"{p}_fraction_of_ceiling"] if link else None)
            for p in paths
        ]
        for m in micro["rows"]
    ]
    of_link = ", % of the link ceiling" if link else ""
    out = [
        "",
        f"gather microbenchmark (random rows of a synthetic table; GB/s of bytes moved{of_link})",
        table(["format", "row B", "rows", "bytes", *paths], body),
    ]
    crossover = micro.get("crossover_rows")
    if device_type != "cuda" or crossover is None:
        out.append("crossover: n/a on CPU (staged/UVA and 'auto' are CUDA paths)")
    else:
        for key, rows in crossover.items() if isinstance(crossover, dict) else []:
            where = "UVA wins at every size" if rows is None else f"staged wins from {rows} rows"
            out.append(f"crossover {key}: {where}")
    out += host_gather_section(micro.get("host_gather") or [])
    out += huge_page_section(micro.get("huge_pages") or {}, paths)
    return out


def host_gather_section(host: list[dict]) -> list[str]:
    """The staged path's host gather (threads) against one single-thread memcpy."""
    if not host:
        return []
    threads = sorted({t for h in host for r in h["rows"] for t in r["gather_gbps"]}, key=int)
    body = [
        [str(h["row_bytes"]), str(r["rows"]), f"{r['memcpy_gbps']:.2f}"]
        + [f"{r['gather_gbps'][t]:.2f}" if t in r["gather_gbps"] else "-" for t in threads]
        + [f"{r['best_fraction_of_memcpy']:.2f}"]
        for h in host
        for r in h["rows"]
    ]
    heads = ["row B", "rows", "memcpy", *[f"{t} thr" for t in threads], "best/memcpy"]
    return ["", "staged host gather vs single-thread memcpy of the same bytes (GB/s)",
            table(heads, body)]  # fmt: skip


def huge_page_section(huge: dict, paths: list[str]) -> list[str]:
    if not huge.get("rows"):
        return []
    mem = huge["memory"]
    body = [
        [str(r["rows"])] + [f"{r[f'{p}_gbps'][0]:.2f} / {r[f'{p}_gbps'][1]:.2f}" for p in paths]
        for r in huge["rows"]
    ]
    return [
        "",
        f"huge pages ({', '.join(mem['huge'])}, {fmt_bytes(huge['huge_bytes'])} in huge pages) "
        f"vs not ({', '.join(mem['plain'])}), {huge['row_bytes']}-byte rows, GB/s",
        table(["rows", *paths], body),
    ]


def report(res: dict) -> str:
    rows, wl, env = res["rows"], res["workload"], res["environment"]
    out = [
        *header(res),
        *paper_section(rows, wl, has_link(res)),
        *sweep_section(rows, wl),
        *checks_section(rows, res["deterministic"]["enabled"]),
        *memory_section(res),
        *grid_section(rows),
        *micro_section(res.get("micro") or {}, env["device_type"]),
        *notes(res),
    ]
    if res["failures"]:
        out += ["", "FAILED:", *(f"- {m}" for m in res["failures"])]
    return "\n".join(out)
