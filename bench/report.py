"""What ``engram-bench`` prints and records about where it ran: text tables and the environment.

``report`` reads only the result dict (the same one written to ``bench.json``), so a saved
result can be printed again.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np
import torch

PROG = "engram-bench"


# --- environment -----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def environment(device: torch.device) -> dict:
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "cupy": None,
        "cuda_driver": None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
        if device.type == "cuda":
            v = cupy.cuda.runtime.driverGetVersion()
            env["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
    except Exception:
        pass
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


# --- formatting ------------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


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


# --- the report, one section per table -------------------------------------------------------
PAPER_HEADERS = [
    "path",
    "prefill tok/s",
    "decode tok/s",
    "total tok/s",
    "penalty % pre/dec/tot",
    "stall ms/step/layer",
    "bytes/step",
    "GB/s",
    "% ceiling",
    "tokens",
]


def paper_section(rows: list[dict], wl: dict) -> list[str]:
    lo, hi = wl["prompt_len"]
    body = []
    for r in rows:
        p, a = r["paper"], r["paper"]["all"]
        pen = p["penalty_pct"]
        body.append(
            [
                r["name"],
                fmt(p["prefill_tok_s"]),
                fmt(p["decode_tok_s"]),
                fmt(p["total_tok_s"]),
                "/".join(fmt(pen[k], "+.1f") for k in ("prefill", "decode", "total")),
                fmt(a["stall_ms_per_step_per_layer"], ".3f"),
                fmt_bytes(a["bytes_per_step"]),
                fmt(a["gbps"], ".2f"),
                fmt(None if a["fraction_of_ceiling"] is None else 100 * a["fraction_of_ceiling"]),
                "same" if r["tokens_match"] else "DIFFERENT",
            ]
        )
    return [
        f"paper workload: {wl['num_seqs']} sequences, prompts Uniform({lo}, {hi}), "
        f"{wl['decode_tokens']} decode tokens each, {wl['max_batched_tokens']} tokens/step budget",
        table(PAPER_HEADERS, body),
    ]


def sweep_section(rows: list[dict], wl: dict) -> list[str]:
    if not rows or not rows[0]["sweep"]:
        return []
    heads = ["path"] + [f"B={s['batch_size']}" for s in rows[0]["sweep"]]
    body = [
        [r["name"]] + [f"{s['tok_s']:.1f} ({fmt(s['penalty_pct'], '+.1f')})" for s in r["sweep"]]
        for r in rows
    ]
    return [
        "",
        f"decode batch sweep: {wl['sweep_steps']} timed steps, tok/s (penalty %)",
        table(heads, body),
    ]


def memory_section(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        m = r["memory"]
        tiers = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m["table_bytes_by_tier"].items() if v)
        body.append(
            [
                r["name"],
                fmt_bytes(m["gpu_max_allocated_bytes"]),
                fmt_bytes(m["host_rss_bytes"]),
                tiers or "-",
            ]
        )
    return ["", "memory", table(["path", "GPU max allocated", "host RSS", "Engram tables"], body)]


def micro_section(micro: dict, device_type: str) -> list[str]:
    if not micro.get("rows"):
        skipped = micro.get("skipped")
        return ["", f"gather microbenchmark skipped: {skipped}"] if skipped else []
    paths = micro["paths"]
    body = [
        [m.get("format", "-"), str(m.get("row_bytes", "-")), str(m["rows"]), fmt_bytes(m["bytes"])]
        + [f"{m[f'{p}_gbps']:.2f} ({100 * m[f'{p}_fraction_of_ceiling']:.0f}%)" for p in paths]
        for m in micro["rows"]
    ]
    out = [
        "",
        "gather microbenchmark (random rows of a synthetic table; GB/s of bytes moved, "
        "% of the link ceiling)",
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
    rows, wl, ceil, env = res["rows"], res["workload"], res["ceiling"], res["environment"]
    out = [
        f"{PROG}: {res['model']['description']} on {env['device']}",
        f"link ceiling: {ceil['gbps']:.2f} GB/s ({ceil['label']}, {fmt_bytes(ceil['bytes'])})",
        "",
        *paper_section(rows, wl),
        *sweep_section(rows, wl),
        *memory_section(rows),
        *micro_section(res.get("micro") or {}, env["device_type"]),
    ]
    return "\n".join(out)
