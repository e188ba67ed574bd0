"""The file tier, measured: ``python -m bench.file_tier``.

1. Random row reads from a file of 264-byte rows (DeepSeek-V4.1's packed fp8 row), page cache
   dropped before every round (``posix_fadvise(DONTNEED)``): thread-pool ``preadv``
   (:class:`offload.row_reader.RowReader`) at several thread counts, ``O_DIRECT`` with aligned
   buffers (the 4 KiB block holding each row, then a copy), and mmap + copy (page faults);
   against the disk's own random-read ceiling from ``fio`` (4 KiB and 512 B ``randread``,
   ``O_DIRECT``).
2. Decode with the built-in model: tables fully host-resident vs the file tier with
   ``--host-memory-bytes`` a quarter of the tables (DRAM cache warm page cache, and with the
   file's pages dropped before each round), on prompts from the held-out corpus files and on
   random ids; tokens compared, DRAM cache hit rate and read time per step from the accounting.

Interleaved rounds after a warm-up, medians with min/max. Writes ``results.json`` and
``file_tier.png`` under ``--out`` (default ``bench/results/<date>-cpu-file-tier``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models.checkpoint import ENGRAM_FILE, default_model_dir, table_key
from models.safetensors_header import read_header
from offload.row_reader import RowReader
from offload.table_load import table_source

from .provenance import environment
from .stats import summarize

ROW_BYTES = 264
BLOCK = 4096


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def fio(path: Path, bs: int, jobs: int, seconds: int) -> dict | None:
    exe = shutil.which("fio")
    if exe is None:
        return None
    args = [exe, "--name=randread", f"--filename={path}", "--rw=randread", f"--bs={bs}",
            "--direct=1", "--ioengine=psync", f"--numjobs={jobs}", "--group_reporting",
            f"--runtime={seconds}", "--time_based", "--output-format=json"]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:]}
    job = json.loads(r.stdout)["jobs"][0]["read"]
    return {"bs": bs, "jobs": jobs, "iops": job["iops"], "mb_per_s": job["bw_bytes"] / 1e6,
            "lat_us_p50": job["clat_ns"]["percentile"]["50.000000"] / 1e3}  # fmt: skip


def read_direct(path: Path, start: int, rows: np.ndarray, threads: int) -> None:
    """Each row through O_DIRECT: the aligned block(s) holding it into an aligned buffer."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = np.empty((rows.size, ROW_BYTES), dtype=np.uint8)

    def part(idx: np.ndarray) -> None:
        buf = mmap.mmap(-1, 2 * BLOCK)  # page aligned, as O_DIRECT needs
        view = np.frombuffer(buf, dtype=np.uint8)
        for i in idx.tolist():
            off = start + int(rows[i]) * ROW_BYTES
            base = off - off % BLOCK
            os.preadv(fd, [buf], base)
            out[i] = view[off - base : off - base + ROW_BYTES]
        del view
        buf.close()

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, np.array_split(np.arange(rows.size), threads)))
    finally:
        os.close(fd)


def io_methods(path: Path, src, n_rows: int, batch: int, repeats: int, threads: list[int]):
    rng = np.random.default_rng(0)
    cache = np.empty((batch, ROW_BYTES), dtype=np.uint8)
    slots = np.arange(batch, dtype=np.int32)
    readers = {t: RowReader(str(path), src, t) for t in threads}
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=src.values.start,
                   shape=(n_rows, ROW_BYTES))  # fmt: skip
    runs = {
        f"preadv x{t}": (lambda rows, r=r: r.read(rows, slots, cache)) for t, r in readers.items()
    }
    runs.update(
        {
            f"O_DIRECT x{t}": (lambda rows, t=t: read_direct(path, src.values.start, rows, t))
            for t in (1, 4)
        }
    )
    runs["mmap + copy"] = lambda rows: np.take(mm, rows, axis=0, out=cache)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for rnd in range(repeats + 1):  # round 0 warms every path up
        for name, fn in runs.items():
            rows = np.unique(rng.integers(0, n_rows, batch * 2))[:batch]
            drop(path)
            t = time.perf_counter()
            fn(rows)
            if rnd:
                seconds[name].append(time.perf_counter() - t)
    for r in readers.values():
        r.close()
    return {name: {"rows_per_s": summarize([batch / x for x in s]),
                   "mb_per_s": summarize([batch * ROW_BYTES / x / 1e6 for x in s])}
            for name, s in seconds.items()}  # fmt: skip


def prompts(kind: str, tok, n: int, length: int, vocab: int) -> list[list[int]]:
    if kind.startswith("random"):
        rng = np.random.default_rng(1)
        return [rng.integers(1, vocab, length).tolist() for _ in range(n)]
    from training.corpus import read_text, split_files

    _, val = split_files()
    out = []
    for p in val:
        ids = tok.encode(read_text(p))
        out += [ids[i : i + length] for i in range(0, len(ids) - length, 4 * length)][:2]
        if len(out) >= n:
            return out[:n]
    return out


def decode(model_dir: Path, budget: int, kind: str, n: int, length: int, new: int, repeats: int):
    from engine.generate import generate
    from offload.offloaded_model import OffloadedModel

    configs = {"host-resident": {}, "file tier, warm page cache": {"host_memory_bytes": budget},
               "file tier, page cache dropped": {"host_memory_bytes": budget}}  # fmt: skip
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    info: dict[str, dict] = {}
    tokens: dict[str, list] = {}
    for rnd in range(repeats + 1):
        for name, kw in configs.items():
            om = OffloadedModel.load(model_dir, "cpu", "resident", "cpu", progress=False, **kw)
            ps = prompts(kind, om.tokenizer, n, length, om.model.config.vocab_size)
            if om.file_tier is not None:
                om.file_tier.check_capacity(n * length * om.model.config.engram_total_heads)
            if "dropped" in name:
                drop(model_dir / ENGRAM_FILE)
            t = time.perf_counter()
            out = generate(om.model, ps, new, rows=om.prefetcher)
            s = time.perf_counter() - t
            if rnd:
                seconds[name].append(s)
                tokens[name] = out
                summ = om.accountant.summary()["layers"]
                info[name] = {str(lid): {k: v for k, v in layer.items() if "file" in k}
                              for lid, layer in summ.items()}  # fmt: skip
            om.close()
    base = np.median(seconds["host-resident"])
    return {
        name: {
            "tokens_per_s": summarize([n * new / x for x in s]),
            "penalty_pct_vs_host": 100.0 * (np.median(s) / base - 1.0),
            "tokens_identical_to_host": tokens[name] == tokens["host-resident"],
            "file_tier": info[name],
        }
        for name, s in seconds.items()
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    io = res["io"]["methods"]
    names = list(io)
    a.barh(names, [io[k]["rows_per_s"]["median"] for k in names])
    for f in res["io"]["fio"]:
        if f and "iops" in f:
            a.axvline(f["iops"], ls="--", c="k")
            a.text(f["iops"], 0, f" fio {f['bs']}B x{f['jobs']}", rotation=90, va="bottom")
    a.set_xlabel("random rows/s, page cache dropped (264 B rows)")
    a.set_title("file-tier reads vs the disk's ceiling (fio, O_DIRECT)", fontsize=9)
    labels, vals = [], []
    for kind, d in res["decode"].items():
        for name, r in d.items():
            labels.append(f"{kind}: {name}")
            vals.append(r["tokens_per_s"]["median"])
    b.barh(labels, vals)
    b.set_xlabel("generated tokens/s (built-in model, CPU)")
    b.set_title(f"decode, tables {res['decode_setup']['table_over_budget']:.1f}x the budget",
                fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.file_tier", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--file-mib", type=int, default=1024, help="size of the random-read file")
    ap.add_argument("--batch", type=int, default=4096, help="distinct rows per read batch")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fio-seconds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    date = time.strftime("%Y-%m-%d")
    out = (
        Path(args.out) if args.out else Path(__file__).parent / "results" / f"{date}-cpu-file-tier"
    )
    out.mkdir(parents=True, exist_ok=True)
    n_rows = (args.file_mib << 20) // ROW_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.safetensors"
        rows = torch.empty((n_rows, ROW_BYTES // 2), dtype=torch.bfloat16)
        rows.view(torch.int16).random_(-(2**15), 2**15 - 1)
        save_file({"t": rows}, str(path))
        del rows
        src = table_source(read_header(path), "t")
        methods = io_methods(path, src, n_rows, args.batch, args.repeats, args.threads)
        ceilings = [fio(path, bs, j, args.fio_seconds) for bs in (4096, 512) for j in (1, 4, 16)]
    model_dir = default_model_dir()
    from models.config import ModelConfig

    keys = {lid: table_key(lid) for lid in ModelConfig.load(model_dir).engram_layer_ids}
    header = read_header(model_dir / ENGRAM_FILE)
    table = sum((s := table_source(header, k)).rows * s.row_bytes for k in keys.values())
    budget = int(table * args.budget_fraction)
    res = {
        "command": "python -m bench.file_tier",
        "args": vars(args),
        "environment": environment(torch.device("cpu")),
        "io": {
            "file_bytes": n_rows * ROW_BYTES,
            "row_bytes": ROW_BYTES,
            "batch": args.batch,
            "methods": methods,
            "fio": ceilings,
        },  # fmt: skip
        "decode_setup": {
            "table_bytes": table,
            "host_memory_bytes": budget,
            "table_over_budget": table / budget,
            "prompts": args.prompts,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
        },  # fmt: skip
        "decode": {
            kind: decode(
                model_dir,
                budget,
                kind,
                args.prompts,
                args.prompt_len,
                args.new_tokens,
                args.repeats,
            )  # fmt: skip
            for kind in ("held-out text", "random ids")
        },
    }
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "file_tier.png")
    print(json.dumps({"io": {k: v["rows_per_s"]["median"] for k, v in methods.items()},
                      "fio": ceilings,
                      "decode": {k: {n: (r["tokens_per_s"]["median"], r["penalty_pct_vs_host"],
                                         r["tokens_identical_to_host"]) for n, r in d.items()}
                                 for k, d in res["decode"].items()}}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
