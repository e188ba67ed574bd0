"""How fast Engram tables load, and the load's peak RSS: ``python -m bench.load_rate``.

Writes one bf16 table of ``--mib`` MiB to a temporary safetensors file, then in interleaved
rounds (each load in a fresh subprocess, so VmHWM is the load's own) loads it with
``TableStore.from_safetensors`` from a cold page cache (the file's pages dropped first with
posix_fadvise) and a warm one (the file read once just before), and times a plain memcpy of
the same bytes as the ceiling. Prints MB/s (median, min-max) of the whole load (allocating the
table's memory included: huge pages are faulted in and zeroed at allocation) and of its
streaming part alone, and peak RSS over the table's bytes, as JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .stats import summarize

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, sys, time
from offload.store import TableStore

path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
if mode == "cold":
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
else:
    while os.read(fd, 64 << 20):
        pass
os.close(fd)

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

before = status("VmRSS:")
t0 = time.perf_counter()
store = TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False)
s = time.perf_counter() - t0
stream = store.load_stats.seconds
grew = status("VmHWM:") - before
print(json.dumps({"seconds": s, "stream": stream, "bytes": store[0].nbytes, "grew": grew}))
"""


def memcpy_seconds(nbytes: int) -> float:
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)  # fault the pages in first: time the copy, not the allocation
    t0 = time.perf_counter()
    b.copy_(a)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="table size in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the table file (default: tmp)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "table.safetensors"
        rows = (args.mib << 20) // 256
        save_file({"t": torch.randn(rows, 128).bfloat16()}, str(path))
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        memcpy = []
        for _ in range(args.repeats):
            for mode in runs:
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), mode],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                runs[mode].append(json.loads(r.stdout.splitlines()[-1]))
            memcpy.append(memcpy_seconds(rows * 256))
    nbytes = rows * 256
    out = {
        "table_bytes": nbytes,
        "cpu_count": os.cpu_count(),
        "memcpy_mb_per_s": summarize([nbytes / 1e6 / s for s in memcpy]),
    }
    for mode, rs in runs.items():
        out[f"load_{mode}_mb_per_s"] = summarize([r["bytes"] / 1e6 / r["seconds"] for r in rs])
        out[f"stream_{mode}_mb_per_s"] = summarize([r["bytes"] / 1e6 / r["stream"] for r in rs])
        out[f"load_{mode}_peak_rss_over_table"] = summarize([r["grew"] / nbytes for r in rs])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
